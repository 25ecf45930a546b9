from scheduler_publisher.cli import main

main()
