"""KV-cache compression methods, one file each; see base.py for the contract."""

from nanokv.methods.registry import (METHODS, check_method, describe_methods, is_quantizer, make_method,
                                     runs_once, selects_pages)

__all__ = ["METHODS", "check_method", "describe_methods", "is_quantizer", "make_method", "runs_once", "selects_pages"]
