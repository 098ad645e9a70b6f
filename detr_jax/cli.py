"""What the command-line entry points share: flag parsing that answers a user's mistake in one line.

absl and ml_collections report a mistyped config field, a missing config file or a value of the wrong type with
tens of lines of chained tracebacks. `parse_flags` (given to `app.run(main, flags_parser=parse_flags)`) turns
them into one line naming the argument; DETR_JAX_TRACEBACK=1 shows the traceback instead. No jax import here.
"""

import difflib
import os
import re
import sys
from typing import List

from absl import flags


def define_multihost_flags(flag_values: flags.FlagValues = flags.FLAGS):
    """--coordinator_address, --coordinator_bind_address, --num_processes, --process_id, --multihost and
    --heartbeat_timeout_s in `flag_values`; returns a function giving their values as the keyword arguments of
    `sharding.maybe_initialize_distributed`."""
    holders = dict(
        coordinator_address=flags.DEFINE_string("coordinator_address", None,
                                                "host:port of process 0, for multi-host CPU/GPU.",
                                                flag_values=flag_values),
        coordinator_bind_address=flags.DEFINE_string(
            "coordinator_bind_address", None, "host:port process 0's coordination service listens on (default: "
            "--coordinator_address itself; '[::]:PORT' for every interface).", flag_values=flag_values),
        num_processes=flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).",
                                           flag_values=flag_values),
        process_id=flags.DEFINE_integer("process_id", None, "This process's id (multi-host).",
                                        flag_values=flag_values),
        multihost=flags.DEFINE_bool("multihost", None, "Start jax.distributed from the environment (SLURM, Open MPI "
                                    "and TPU pods are detected without it; --nomultihost: never).",
                                    flag_values=flag_values),
        heartbeat_timeout_s=flags.DEFINE_integer(
            "heartbeat_timeout_s", None, "Seconds without a heartbeat after which a process counts as dead and the "
            "others stop, naming it (default: jax's, 100).", lower_bound=1, flag_values=flag_values))
    return lambda: {name: holder.value for name, holder in holders.items()}


def quiet_logs() -> None:
    """Our progress at INFO; absl's (orbax's, jax's) only from WARNING: a CLI's own lines are then readable."""
    import logging  # pylint: disable=g-import-not-at-top

    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("detr_jax").setLevel(logging.INFO)


def _root(error: BaseException) -> BaseException:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _argument_naming(argv: List[str], key: str) -> str:
    """The first --config.* argument whose field path contains `key` (else all of them)."""
    overrides = [a for a in argv if a.startswith("--config.")]
    named = [a for a in overrides if key in a.split("=", 1)[0].split(".")]
    return (named or overrides or ["--config"])[0]


def _config_file_argument(argv: List[str]):
    """The --config file as given: `--config=FILE` or `--config FILE` (either with its `:arg`), else None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def describe(error: BaseException, argv: List[str]) -> str:
    """One line for a flag-parsing error."""
    root = _root(error)
    message = " ".join(str(root).split())
    config_file = _config_file_argument(argv)
    if isinstance(root, OSError) and "config" in str(error).lower():
        detail = str(root).strip().splitlines()[-1].strip()
        return f"cannot load the config file {config_file}: {detail}"
    if isinstance(root, (AttributeError, KeyError)):
        key = message.strip("'\"")
        argument = _argument_naming(argv, key)
        return (f"{argument}: the config has no field {key!r}{_did_you_mean(argument, key)} (see the config file for "
                "its fields)")
    # A value that does not parse: name the argument whose value the message quotes.
    quoted = [a for a in argv if a.startswith("--config.") and "=" in a and a.split("=", 1)[1] in message]
    where = quoted[0] if quoted else _argument_naming(argv, "")
    if isinstance(error, flags.Error) and not quoted:  # another flag: absl's own line names it
        return " ".join(str(error).split())
    number = re.match(r"(?:invalid literal for|could not convert string to) (int|float)", message)
    if number and quoted:  # Python's own words for a value that is no number
        kind = {"int": "an integer", "float": "a number"}[number.group(1)]
        return f"{where}: the field takes {kind}, got {quoted[0].split('=', 1)[1]!r}"
    return f"{where}: {message}"


def _did_you_mean(argument: str, key: str) -> str:
    """", did you mean 'hidden_dim'?" for a misspelt field of the one config schema (every config has the base
    config's fields), else "". This module imports no detr_jax layer: the schema is the one the config file
    already loaded."""
    path = argument.split("=", 1)[0][len("--config."):].split(".")
    schema = sys.modules.get("detr_jax.config")  # loaded by the config file (every config starts from base_config)
    if schema is None:
        return ""
    try:
        node = schema.base_config()
        for part in path[:path.index(key)] if key in path else []:
            node = node[part]
        close = difflib.get_close_matches(key, list(node.keys()), n=1)
    except Exception:  # pylint: disable=broad-except  (no suggestion rather than a second error)
        return ""
    return f", did you mean {close[0]!r}?" if close else ""


def _exit_with(error: BaseException, argv: List[str]):
    if os.environ.get("DETR_JAX_TRACEBACK"):
        raise error
    print(f"error: {describe(error, argv)}", file=sys.stderr)
    sys.exit(2)


def define_config_file(*args, **kwargs):
    """`config_flags.DEFINE_config_file`, which loads the default config file and applies the command line's
    --config.* overrides right away (at definition): a mistake there exits with one line."""
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    try:
        return config_flags.DEFINE_config_file(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
        _exit_with(e, sys.argv)


def config_value(holder, argv: List[str]):
    """`holder.value` of a DEFINE_config_file flag (ml_collections loads the file and applies the overrides on
    first access); a mistake exits with status 2 and one line."""
    try:
        value = holder.value
        value.keys()  # a config file that failed to load raises on first use, not on access
        return value
    except Exception as e:  # pylint: disable=broad-except
        _exit_with(e, argv)


def parse_flags(argv: List[str]) -> List[str]:
    """absl flag parsing; a mistake exits with status 2 and one line (`error: ...`)."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
        _exit_with(e, argv)
