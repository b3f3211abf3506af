"""Workflows of the CLI commands: ``run_*``-style functions that take no argparse.

`alphastomics.main` checks the arguments and calls them.
"""
