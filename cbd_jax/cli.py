"""What every launch script shares: one-line errors, a clean Ctrl-C, config files with overrides.

`run(main)` runs a command's ``main(args)``: a fault the user can fix (a bad path, a bad value, a
full disk, a string passed to ``sys.exit``) prints ONE line on stderr, ``error: ...``, and exits
with 2; Ctrl-C prints one line and exits with 130; a link stopped by a signal after saving its
checkpoint (`chain.guards.Stopped`) prints one line and exits with 128 + the signal (143 for
SIGTERM, 130 for SIGINT); any other exception prints one line naming its type and exits with 1
(the lines are `cbd_jax.errors.one_line`).
``--debug`` (or ``CBD_DEBUG=1``) shows the full traceback instead.

`load_config("configs/x.py:variant", ["chain[0].steps=100"])` loads an ``ml_collections`` config
file and applies ``--config.FIELD=VALUE`` overrides with the same value parsers as
``ml_collections.config_flags``, turning every failure into one `UsageError` line: a missing file,
an unknown variant, an unknown field (with the closest name), an index out of range, a bad value.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cbd_jax.errors import UsageError, one_line

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
_KINDS = {bool: "true or false", int: "a whole number", float: "a number",
          tuple: "a tuple such as '(1, 2)'"}


def _user_fault(e: BaseException) -> bool:
  """True for faults in the user's input or machine (exit 2), False for internal errors."""
  return isinstance(e, (ValueError, OSError))


def debug_requested(args: Sequence[str]) -> bool:
  """--debug among the arguments, or CBD_DEBUG=1 in the environment."""
  return "--debug" in args or os.environ.get("CBD_DEBUG", "") not in ("", "0")


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> None:
  """Runs ``main(args)`` (args without --debug) as a command, then exits with its status."""
  args = list(sys.argv[1:] if argv is None else argv)
  debug = debug_requested(args)
  args = [a for a in args if a != "--debug"]
  plain_error, argparse.ArgumentParser.error = argparse.ArgumentParser.error, _argparse_error
  try:
    code = main(args)
  except KeyboardInterrupt:
    if debug:
      raise
    _fail("interrupted (Ctrl-C)", EXIT_INTERRUPTED)
  except SystemExit as e:
    if isinstance(e.code, str) and not debug:  # sys.exit("error: ...") in a script.
      _fail(e.code, EXIT_USAGE)
    raise
  except Exception as e:  # noqa: BLE001  (the point: one line instead of a traceback)
    if debug:
      raise
    if isinstance(getattr(e, "exit_code", None), int):  # A planned stop (guards.Stopped).
      _fail(one_line(e), e.exit_code)
    if _user_fault(e):
      _fail(f"error: {one_line(e)}", EXIT_USAGE)
    _fail(f"error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)", 1)
  finally:
    argparse.ArgumentParser.error = plain_error
  sys.exit(code or 0)


def _argparse_error(self: argparse.ArgumentParser, message: str) -> None:
  """argparse's usage error as one line (the usage itself is in --help)."""
  self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")


def _fail(message: str, code: int) -> None:
  """Prints one line on stderr and exits with ``code``."""
  line = " ".join(message.split("\n"))
  sys.stdout.flush()
  print(line if line.startswith(("error:", "interrupted", "stopped:")) else f"error: {line}",
        file=sys.stderr, flush=True)
  sys.exit(code)


# --- config files -------------------------------------------------------------------------------


def split_spec(spec: str) -> tuple[Path, str | None]:
  """"path/to/config.py:variant" -> (path, "variant"); no colon -> (path, None)."""
  path, sep, variant = str(spec).partition(":")
  if sep and not path.endswith(".py") and Path(spec).exists():
    return Path(spec), None
  return Path(path).expanduser(), (variant if sep else None)


def load_module(path: Path):
  """Imports a config file as a module; a missing or broken file is one UsageError."""
  if not path.is_file():
    hint = "it is a folder" if path.is_dir() else "no such file"
    raise UsageError(f"config file {path} not found ({hint}); pass an existing file, e.g. "
                     "--config=configs/qwen_chain.py:smoke")
  spec = importlib.util.spec_from_file_location(f"cbd_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001  (any error of the user's file, on one line)
    raise UsageError(f"config file {path} could not be loaded ({type(e).__name__}: "
                     f"{one_line(e)}); fix the file") from None
  if not callable(getattr(module, "get_config", None)):
    raise UsageError(f"config file {path} has no get_config(arg) function; add one")
  return module


def load_config(spec: str, overrides: Sequence[str] = (), lock: bool = True):
  """Loads "file.py[:variant]", applies "FIELD=VALUE" overrides and returns the ConfigDict."""
  path, variant = split_spec(spec)
  module = load_module(path)
  try:
    config = module.get_config() if variant is None else module.get_config(variant)
  except (ValueError, KeyError, TypeError) as e:
    raise UsageError(f"{spec}: {one_line(e)}") from None
  for item in overrides:
    field, sep, raw = item.partition("=")
    if not sep:
      raise UsageError(f"--config.{item}: no value; write --config.{item}=VALUE")
    set_field(config, field, raw, where=spec)
  if lock and hasattr(config, "lock"):
    config.lock()
  return config


def config_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
  """(the --config spec, ["FIELD=VALUE", ...]) from a command line; other flags are skipped."""
  spec, overrides, args, i = None, [], list(argv), 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--config.") or arg.startswith("--config="):
      name, sep, value = arg[2:].partition("=")
      if not sep and i + 1 < len(args) and not args[i + 1].startswith("--"):
        value, sep, i = args[i + 1], "=", i + 1
      if name == "config":
        spec = value
      else:
        overrides.append(f"{name[len('config.'):]}{sep}{value}")
    elif arg == "--config" and i + 1 < len(args):
      spec, i = args[i + 1], i + 1
    i += 1
  return spec, overrides


def start_logging(argv: Sequence[str]) -> None:
  """A launch script's start: refuses positional arguments (fields are --config.FIELD=VALUE),
  logs INFO with times, quiets third-party loggers."""
  import logging

  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {list(argv[1:])}; fields are set as "
             "--config.FIELD=VALUE")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src", "datasets", "httpx", "huggingface_hub"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_absl_flags(argv: list[str]) -> list[str]:
  """Checks ``--config`` and its overrides (one-line errors), then parses the absl flags of a
  launch script; returns the arguments absl leaves (``argv[0]`` first)."""
  from absl import app, flags

  check_config_args(argv[1:])
  app.define_help_flags()
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UsageError(f"{e}; see {Path(argv[0]).name} --helpfull") from None


def check_config_args(argv: Sequence[str]) -> None:
  """Loads the --config of a command line with its overrides once, raising one-line errors."""
  spec, overrides = config_args(argv)
  if spec is None:
    if overrides:
      raise UsageError(f"--config.{overrides[0]} given without --config=FILE; pass the file too")
    return
  load_config(spec, overrides)


# --- field paths --------------------------------------------------------------------------------


def _parts(field: str) -> tuple:
  """"chain[0].loss.kind" -> ("chain", 0, "loss", "kind")."""
  from ml_collections.config_flags import config_path

  try:
    return config_path.split(field)
  except (ValueError, SyntaxError):
    raise UsageError(f"--config.{field}: not a field path; write e.g. --config.chain[0].steps=100"
                     ) from None


def _show(parts: Sequence) -> str:
  """("chain", 0, "steps") -> "chain[0].steps"."""
  out = ""
  for p in parts:
    out += f"[{p!r}]" if not isinstance(p, str) else (f".{p}" if out else p)
  return out


def _child(node: Any, key, done: tuple, where: str) -> Any:
  """node[key] (or node.key), with one-line errors naming the path and the fix."""
  here = _show((*done, key))
  if isinstance(key, int):
    if not isinstance(node, (list, tuple)):
      raise UsageError(f"--config.{here}: {_show(done)} is not a list of entries; drop [{key}]")
    if not -len(node) <= key < len(node):
      raise UsageError(f"--config.{here}: index {key} out of range: {where} has {len(node)} "
                       f"entries in {_show(done)} ({_show(done)}[0] .. {_show(done)}"
                       f"[{len(node) - 1}])")
    return node[key]
  if node is None or not hasattr(node, "keys"):
    raise UsageError(f"--config.{here}: {_show(done)} is {node!r}, it has no field {key!r}")
  if key not in node.keys():
    names = [str(k) for k in node.keys()]
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    hint = (f"did you mean --config.{_show((*done, close[0]))}?" if close
            else f"fields here: {', '.join(sorted(names))}")
    raise UsageError(f"--config.{here}: unknown field {key!r} in {where}; {hint}")
  return node[key]


def _parse_value(raw: str, current: Any, field: str) -> Any:
  """The override string parsed as the field's current type (as ml_collections.config_flags)."""
  from absl import flags
  from ml_collections.config_flags import tuple_parser

  parsers = {bool: flags.BooleanParser(), int: flags.IntegerParser(),
             float: flags.FloatParser(), tuple: tuple_parser.TupleParser()}
  kind = type(current)
  if kind is str:
    return raw
  if kind in parsers:
    try:
      return parsers[kind].parse(raw)
    except (ValueError, TypeError, SyntaxError):
      raise UsageError(f"--config.{field}={raw}: {field} takes {_KINDS[kind]} (now "
                       f"{current!r}); give one, e.g. --config.{field}={current!r}") from None
  if hasattr(current, "keys"):
    raise UsageError(f"--config.{field}: is a group of fields; set them one by one, e.g. "
                     f"--config.{field}.{sorted(current.keys())[0]}=...")
  if current is None:  # As ml_collections.config_flags: a None field has no type to parse to.
    raise UsageError(f"--config.{field}: is None in the config, so its type is unknown and it "
                     "cannot be set from the command line; set it in the config file")
  try:
    return ast.literal_eval("True" if raw == "true" else "False" if raw == "false" else raw)
  except (ValueError, SyntaxError):
    return raw


def set_field(config, field: str, raw: str, where: str = "the config") -> None:
  """Sets config.FIELD (a path like "chain[0].loss.kind") from its command-line string."""
  parts = _parts(field)
  node, done = config, ()
  for key in parts[:-1]:
    node, done = _child(node, key, done, where), (*done, key)
  last = parts[-1]
  current = _child(node, last, done, where)
  if isinstance(last, int):
    raise UsageError(f"--config.{field}: is a whole entry; set its fields one by one, e.g. "
                     f"--config.{field}.steps=...")
  value = _parse_value(raw, current, field)
  try:
    node[last] = value
  except (TypeError, ValueError, AttributeError) as e:
    raise UsageError(f"--config.{field}={raw}: {one_line(e)}") from None
