"""The command line: `scheduler-publisher` and its subcommands (main.py), their arguments
and the options file, the validation report and the demo broker. The top layer: it may
import every other part of the package.
"""
