"""`python -m minislm.weights {fetch,list,verify,quantize}`: prepare the pretrained experts and check they are intact.

    fetch     download, verify, convert and place every expert not yet prepared; repairs a damaged folder
    list      each expert and its state (prepared, damaged, missing), by the cheap check (sizes, mtimes)
    verify    hash every byte of every prepared folder against its manifest; exit 2 if any is damaged
    quantize  write an expert's int8 version, <name>-int8/ beside it (minislm.experts.quantized)
list and verify include the int8 folders that exist.
Exit codes: 0 ok, 2 usage errors, a damaged folder, an expert to quantize that is not prepared or a weights
folder that cannot be written, 1 a failed download. A closed pipe (`list | head`) or a closed stdout ends the
listing quietly; the exit code still says whether every expert is intact.
"""
import sys
from pathlib import Path

from minislm.atomic import unwritable
from minislm.cli import Log, Parser, error, reserve_standard_fds
from minislm.experts import fetch as fetch_lib
from minislm.experts import quantized, registry


def main(argv=None):
    ap = Parser(prog="python -m minislm.weights", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, verify, convert and place the experts (repairs damaged ones)")
    f.add_argument("--only", nargs="+", metavar="NAME", help=f"only these experts ({', '.join(registry.EXPERTS)})")
    f.add_argument("--dest", help="folder to place them in (default: $MINISLM_WEIGHTS_DIR or weights/experts)")
    sub.add_parser("list", help="show the experts and whether they are prepared")
    v = sub.add_parser("verify", help="hash every prepared file against its manifest")
    v.add_argument("--dest", help="the store to check (default: $MINISLM_WEIGHTS_DIR or weights/experts)")
    q = sub.add_parser("quantize", help="write the int8 version of prepared experts (<name>-int8/ beside them)")
    q.add_argument("names", nargs="+", metavar="NAME", help=f"experts to quantize ({', '.join(registry.ENCODERS)})")
    q.add_argument("--dest", help="the store holding them (default: $MINISLM_WEIGHTS_DIR or weights/experts)")
    q.add_argument("--force", action="store_true", help="write it again even if an intact one is there")
    reserve_standard_fds()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    out = Log()
    try:
        if args.cmd in ("fetch", "quantize"):
            for name in (args.only or []) if args.cmd == "fetch" else args.names:
                registry.source(name)
            store = Path(args.dest or registry.weights_dir())
            todo = [n for n in (args.only or registry.EXPERTS)
                    if registry.state(store / n) != "prepared"] if args.cmd == "fetch" else args.names
            why = unwritable(store) if todo else None
            if why:
                error(f"the weights folder {store} cannot be written ({why}); set MINISLM_WEIGHTS_DIR (or --dest) "
                      f"to a writable folder")
                return 2
        if args.cmd == "fetch":
            for name, folder in fetch_lib.fetch(args.only, args.dest, progress=out).items():
                out(f"{name}: {folder}")
            return 0
        if args.cmd == "quantize":
            for name in args.names:
                quantized.quantize_expert(name, args.dest, force=args.force, progress=out)
            return 0
        store = registry.weights_dir() if args.cmd == "list" or not args.dest else args.dest
        damaged = []
        for src in registry.EXPERTS.values():
            for name, remedy in ((src.name, registry.FETCH_COMMAND),
                                 (registry.int8_name(src.name), f"{registry.QUANTIZE_COMMAND} {src.name}")):
                folder = Path(store) / name
                if name != src.name and not folder.exists():
                    continue  # an int8 version is listed only once written
                if args.cmd == "list":
                    state = registry.state(folder)
                elif registry.read_manifest(folder) is None:
                    state = "missing" if name == src.name else f"damaged: no readable {registry.MANIFEST}"
                else:
                    problems = registry.integrity_problems(folder, full=True)
                    state = "intact (every byte hashed)" if not problems else "damaged: " + "; ".join(problems)
                if state.startswith("damaged"):
                    damaged.append((name, remedy))
                hint = f"  -> run `{remedy}`" if state == "missing" or state.startswith("damaged") else ""
                out(f"tier {src.tier}  {name:26s} {src.params_m:6.1f} M params  {state}  {folder}{hint}")
        if damaged:
            error(f"damaged (files changed since they were prepared): {', '.join(n for n, _ in damaged)}; run "
                  + " and ".join(f"`{r}`" for r in dict.fromkeys(r for _, r in damaged)) + " to prepare them again")
            return 2
    except KeyboardInterrupt:  # fetch and quantize build each folder aside and swap it in whole
        error("interrupted; every expert already prepared is intact and nothing half-made was kept; run the same "
              "command again to go on")
        return 130
    except (ValueError, registry.MissingExpertError) as e:  # a missing expert to quantize: fetch it first
        error(e)
        return 2
    except PermissionError as e:
        error(f"{e.filename or 'the weights folder'} cannot be written ({e.strerror}); set MINISLM_WEIGHTS_DIR (or "
              f"--dest) to a writable folder")
        return 2
    except (fetch_lib.FetchError, OSError) as e:
        error(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
