"""`python -m thinktime` runs the command line."""
from thinktime.cli import main

main()
