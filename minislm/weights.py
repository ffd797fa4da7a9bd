"""`python -m minislm.weights {fetch,list,verify}`: prepare the pretrained experts and check they are intact.

    fetch    download, verify, convert and place every expert not yet prepared; repairs a damaged folder
    list     each expert and its state (prepared, damaged, missing), by the cheap check (sizes, mtimes)
    verify   hash every byte of every prepared folder against its manifest; exit 2 if any is damaged
Exit codes: 0 ok, 2 usage errors or a damaged folder, 1 a failed download.
"""
import sys
from pathlib import Path

from minislm.cli import Parser
from minislm.experts import fetch as fetch_lib
from minislm.experts import registry


def main(argv=None):
    ap = Parser(prog="python -m minislm.weights", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, verify, convert and place the experts (repairs damaged ones)")
    f.add_argument("--only", nargs="+", metavar="NAME", help=f"only these experts ({', '.join(registry.EXPERTS)})")
    f.add_argument("--dest", help="folder to place them in (default: $MINISLM_WEIGHTS_DIR or weights/experts)")
    sub.add_parser("list", help="show the experts and whether they are prepared")
    v = sub.add_parser("verify", help="hash every prepared file against its manifest")
    v.add_argument("--dest", help="the store to check (default: $MINISLM_WEIGHTS_DIR or weights/experts)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    try:
        if args.cmd == "fetch":
            for name, folder in fetch_lib.fetch(args.only, args.dest).items():
                print(f"{name}: {folder}")
            return 0
        store = registry.weights_dir() if args.cmd == "list" or not args.dest else args.dest
        damaged = []
        for src in registry.EXPERTS.values():
            folder = Path(store) / src.name
            if args.cmd == "list":
                state = registry.state(folder)
            elif registry.read_manifest(folder) is None:
                state = "missing"
            else:
                problems = registry.integrity_problems(folder, full=True)
                state = "intact (every byte hashed)" if not problems else "damaged: " + "; ".join(problems)
            if state.startswith("damaged"):
                damaged.append(src.name)
            hint = f"  -> run `{registry.FETCH_COMMAND}`" if state == "missing" or state.startswith("damaged") else ""
            print(f"tier {src.tier}  {src.name:26s} {src.params_m:6.1f} M params  {state}  {folder}{hint}")
        if damaged:
            print(f"error: damaged (files changed since they were prepared): {', '.join(damaged)}; run "
                  f"`{registry.FETCH_COMMAND}` to prepare them again", file=sys.stderr)
            return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (fetch_lib.FetchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
