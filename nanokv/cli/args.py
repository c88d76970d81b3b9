"""What the command lines share: a parser whose errors are one line, and --method-arg parsing."""

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on an error; one line is enough."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def method_options(pairs: list[str]) -> dict:
    """--method-arg values -> options; the method converts and checks values."""
    from nanokv.methods.registry import parse_options

    return parse_options(pairs, "--method-arg")
