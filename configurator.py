"""
Settings for every script, nanoGPT style: each script keeps its settings as plain
module globals at the top, then calls configure(globals()). That applies, in order,

    python SCRIPT.py config/some_run.py --key=value --other_key=value

a config file (Python, run with the script's settings in scope: config files are
code, so only run ones you trust), then each --key=value. A key that the script
does not have, or a value of the wrong type, ends the program with one clear line
and exit code 2 -- a typo never silently trains the wrong model.
"""

import ast
import difflib
import math
import os
import sys

SETTING_TYPES = (bool, int, float, str, type(None))


def fail(message):
    """A user error: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _nearest(key, known):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key, value, default, source):
    """Check value against the type of the setting's default; ints are fine for floats."""
    if default is None or type(value) is type(default):
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    fail(f"{source}: {key} must be {type(default).__name__}, got {value!r} ({type(value).__name__})")


def _parse_value(raw, default):
    if isinstance(default, str):
        return raw  # strings are taken as typed: --start=123 is the text "123"
    if isinstance(default, bool) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # not a Python literal: left as text, and the type check says so


def configure(settings, argv=None):
    """Apply a config file and --key=value overrides onto `settings` (a script's globals()).

    Returns the settings as a plain dict, ready to be stored in a checkpoint.
    """
    argv = sys.argv[1:] if argv is None else argv
    known = sorted(k for k, v in settings.items()
                   if not k.startswith("_") and isinstance(v, SETTING_TYPES))
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                fail(f"config file not found: {arg}")
            scope = {k: settings[k] for k in known}
            try:
                with open(arg) as f:
                    code = compile(f.read(), arg, "exec")
                exec(code, scope)
            except Exception as e:  # a config file is user code: whatever it raises is a user error
                fail(f"config file {arg} failed: {type(e).__name__}: {e}")
            for key, value in scope.items():
                if key.startswith("_") or key in known and value is settings[key]:
                    continue
                if key not in known:
                    if isinstance(value, SETTING_TYPES):
                        fail(f"{arg}: unknown setting '{key}'{_nearest(key, known)}")
                    continue  # imports and helper objects in a config file are fine
                settings[key] = _coerce(key, value, settings[key], arg)
        else:
            key, eq, raw = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in known:
                fail(f"unknown setting '--{key}'{_nearest(key, known)}")
            if not eq:
                if not isinstance(settings[key], bool):
                    fail(f"--{key} needs a value: --{key}=...")
                raw = "True"
            settings[key] = _coerce(key, _parse_value(raw, settings[key]), settings[key], f"--{key}")
    for key in known:
        if isinstance(settings[key], str) and "\0" in settings[key]:
            fail(f"{key} contains a NUL byte")
    return {k: settings[k] for k in known}


def _within(value, rule):
    """Does value obey rule: '>= 1', '> 0', or an interval like '[0, 1)' or '(0, 1]'?"""
    if rule[0] in "[(":
        low, high = (float(x) for x in rule[1:-1].split(","))
        return ((value >= low) if rule[0] == "[" else (value > low)) and \
               ((value <= high) if rule[-1] == "]" else (value < high))
    op, bound = rule.split()
    return {">=": value >= float(bound), ">": value > float(bound)}[op]


def check_ranges(settings, rules):
    """Each setting named in rules ({name: '>= 1' | '> 0' | '[0, 1)' ...}) must be a finite number
    obeying its rule; the first that is not ends the program with one clear line."""
    for name, rule in rules.items():
        value = settings[name]
        if not (math.isfinite(value) and _within(value, rule)):
            fail(f"{name} must be {'in ' if rule[0] in '[(' else ''}{rule}, got {value!r}")
