from scheduler_publisher.cli.main import main

main()
