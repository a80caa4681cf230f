"""__main__ of the zip archive appended to printer-connector-linux-mipsle.

The C launcher puts the executable itself (the archive) on sys.path and runs
this module; it runs connector.py as __main__, the way `python -m connector`
would, but keeps sys.argv as the user typed it.
"""
import runpy

runpy._run_module_as_main("connector", alter_argv=False)
