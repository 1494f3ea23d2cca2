"""``vera-run``: run a vera-export graph with its tasks, from the shell (argparse: no extra deps).

    vera-run tasks m.onnx                         list the task files beside the graph
    vera-run run m.onnx --input x.npz --task T    run one task (T, or T=PATH to load a file)
    vera-run compare m.onnx --input x.npz         run one input with every task: a table
    vera-run generate m.onnx --prompt "…" --task T  generate text (a graph exported with --kv-cache)
    vera-run demo m.web.onnx [--port P]           a page on 127.0.0.1: every task as you type
    vera-run bank create|add|list|remove|compact BANK ...   many tasks of one graph in one file
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from ._contract import Contract
from ._device import create_session
from ._errors import FeedError, VeraError, printable
from ._io import atomic_write_bytes, file_problem, refuse_overwriting
from ._jsonio import json_inputs, parse_json
from ._publish import pending_journal
from ._session import VeraSession
from ._taskfile import TaskFileError, read_task, task_files_beside
from ._text import encode_left_padded, load_tokenizer

_EXPECTED = (VeraError, FileNotFoundError)


def read_inputs(path: Path, session: VeraSession) -> dict[str, np.ndarray]:
    """Model inputs from .npz (by name), .npy (the graph's only input) or JSON ({name: nested list})."""
    if problem := file_problem(path):
        raise FileNotFoundError(f"input file {path} {problem}.")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        if path.suffix == ".npy":
            if len(session.input_names) != 1:
                raise FeedError(f"{path} holds one array; the graph needs {session.input_names}: use .npz or JSON.")
            return {session.input_names[0]: np.load(path, allow_pickle=False)}
    except (ValueError, OSError, EOFError) as exc:  # object arrays (pickles), truncated or not numpy at all
        raise FeedError(f"{path} is not a readable numpy file without pickled objects: {exc}") from exc
    if path.suffix == ".json":
        return _json_inputs(path, session)
    raise FeedError(f"{path}: inputs must be .npz, .npy or .json.")


def _json_inputs(path: Path, session: VeraSession) -> dict[str, np.ndarray]:
    return json_inputs(parse_json(path.read_bytes(), str(path)), str(path), session.inputs)


def _quiet_options(args):
    """ONNX Runtime logs its own errors: our one-line message says it, unless --verbose."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3 if args.verbose else 4
    return options


def _session(args) -> VeraSession:
    session = VeraSession(args.graph, device=args.device, session_options=_quiet_options(args), bank=args.bank)
    session.load_tasks_beside()
    for entry in getattr(args, "task_files", None) or []:
        session.load_task(*_name_and_path(entry))
    return session


def _name_and_path(entry: str) -> tuple[str, str]:
    """``NAME=PATH`` (--load, bank add) as its two parts; FeedError when either is missing."""
    name, _, path = entry.partition("=")
    if not name or not path:
        raise FeedError(f"{printable(entry, 200)!r}: give NAME=PATH (a task name and a task file).")
    return name, path


def _require_loaded(session: VeraSession, names: list[str], graph: str) -> None:
    """A task the command names must be one of the task files beside the graph or a --load."""
    for name in names:
        if not session.has_task(name):
            raise FeedError(
                f"no task '{printable(name, 64)}': the tasks beside {graph} are {sorted(session.tasks)}; load"
                f" another with --load {printable(name, 64)}=PATH (a task file, .onnx_adapter or PEFT"
                " adapter_model.safetensors)."
            )


def _summary(array: np.ndarray, width: int = 4) -> str:
    flat = np.asarray(array).reshape(-1)
    values = " ".join(f"{v:.4g}" for v in flat[:width])
    return f"{list(np.shape(array))} [{values}{' ...' if flat.size > width else ''}]"


def _contract_of(graph: str, args) -> Contract:
    """A graph's contract, read without a VeraSession (which would finish an interrupted publish)."""
    if problem := file_problem(graph):
        raise FileNotFoundError(f"graph file {graph} {problem}.")
    ort_session, _ = create_session(graph, "cpu", _quiet_options(args))
    return Contract.from_metadata(ort_session.get_modelmeta().custom_metadata_map, graph)


def _cmd_tasks(args) -> None:
    """Read only: unlike a VeraSession, it neither finishes an interrupted publish nor builds anything."""
    contract = _contract_of(args.graph, args)
    print(f"{printable(args.graph, 400)}: default task '{contract.default_task}'")
    if journal := pending_journal(args.graph):
        print(f"  note: {printable(journal.name)} records an export interrupted while it put its files in place;"
              " opening the graph with VeraSession (vera-run run) or exporting again finishes it.")
    for path in task_files_beside(args.graph).values():
        try:
            task = read_task(path, contract)
            print(f"  {printable(task.name, 64):<20} {printable(path.name)}")
        except TaskFileError as exc:
            print(f"  {'(refused)':<20} {printable(path.name)}: {printable(exc, 2000)}")


def _cmd_run(args) -> None:
    if args.out:  # before anything runs: an output never replaces an input
        refuse_overwriting([args.out], [args.input, args.graph], FeedError)
    session = _session(args)
    _require_loaded(session, [args.task] if args.task else [], args.graph)
    results = session.run(read_inputs(Path(args.input), session), task=args.task)
    if args.out:
        buffer = io.BytesIO()
        np.savez(buffer, **results)
        try:
            atomic_write_bytes(args.out, buffer.getvalue())
        except OSError as exc:  # name the file asked for, not its temporary twin
            raise OSError(exc.errno, exc.strerror, args.out) from exc
        print(f"Wrote {args.out}")
    for name, value in results.items():
        print(f"{printable(name)}: {_summary(value)}")


def _cmd_compare(args) -> None:
    session = _session(args)
    feeds = read_inputs(Path(args.input), session)
    output = args.output or session.output_names[0]
    print(f"{'task':<20} {printable(output)} (row 0)")
    for name in session.tasks:
        value = session.run(feeds, task=name, outputs=[output])[output]
        print(f"{name:<20} {_summary(value[0], width=6)}")


def _cmd_generate(args) -> None:
    session = _session(args)
    session.require_cache()  # before the tokenizer: a graph without a cache is the problem to name
    tasks = args.tasks.split(",") if args.tasks else None
    _require_loaded(session, [args.task] if args.task else tasks or [], args.graph)
    if tasks is not None and len(tasks) != len(args.prompt):
        raise FeedError(f"--tasks names {len(tasks)} tasks for {len(args.prompt)} prompts: give one per --prompt.")
    tokenizer = load_tokenizer(session.model_path)
    ids, mask = encode_left_padded(tokenizer, args.prompt, session.token_ids().pad)
    options = {"do_sample": args.sample, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
               "seed": args.seed}
    out = session.generate(ids, mask, task=args.task, tasks=tasks, max_new_tokens=args.max_new_tokens, **options)
    for i, row in enumerate(out[:, ids.shape[1]:]):
        text = tokenizer.decode([int(t) for t in row], skip_special_tokens=True)
        label = f"[{tasks[i] if tasks else args.task or session.default_task}] " if len(args.prompt) > 1 else ""
        print(f"{label}{printable(text, 1 << 20)}")


def _cmd_demo(args) -> None:
    from ._demo import demo_files, find_js, make_server

    files = demo_files(args.graph, _contract_of(args.graph, args), find_js(args.js))
    server = make_server(files, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"Serving {printable(args.graph, 400)} with {len(files.manifest['tasks'])} tasks at"
          f" http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("Stopped.")
    finally:
        server.server_close()


def _cmd_bank(args) -> None:
    """create, add, list, remove, compact: a TaskBank file, torch-free."""
    from ._bank import TaskBank

    if args.action == "create":
        if not args.graph:
            raise FeedError("bank create needs the graph the bank is for: --graph m.onnx.")
        bank = TaskBank.create(args.bank, _contract_of(args.graph, args))
        print(f"Created {printable(args.bank, 400)} for {printable(args.graph, 400)}")
        return
    bank = TaskBank(args.bank)
    if args.action == "add":
        for entry in args.items:
            bank.add(*_name_and_path(entry))
        print(f"Added {len(args.items)} task(s); {len(bank)} in the bank")
    elif args.action == "remove":
        for name in args.items:
            bank.remove(name)
        print(f"Removed {len(args.items)} task(s); {len(bank)} in the bank")
    elif args.action == "compact":
        print(f"Reclaimed {bank.compact():,} bytes; {len(bank)} tasks")
    else:
        for name in bank.names(args.prefix or ""):
            print(name)


def _message(exc: Exception) -> str:
    """What failed, in words: ours as they are, OS errors by file, anything else marked unexpected."""
    if isinstance(exc, OSError) and exc.filename:
        return f"cannot use {exc.filename}: {exc.strerror or exc}."
    if isinstance(exc, _EXPECTED):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)"


def _graph_command(commands, name: str, func, text: str, inputs: bool = True) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=text)
    command.add_argument("graph")
    if inputs:
        command.add_argument("--input", required=True, help=".npz (by name), .npy (single input) or .json")
    command.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    command.add_argument("--load", dest="task_files", action="append", metavar="NAME=PATH",
                         help="also load this task file (native, .onnx_adapter or PEFT adapter_model.safetensors)")
    command.add_argument("--bank", help="a task bank of this graph: task names not loaded are read from it")
    command.set_defaults(func=func)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vera-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    tasks = commands.add_parser("tasks", help="list the task files beside a graph")
    tasks.add_argument("graph")
    tasks.set_defaults(func=_cmd_tasks)
    run = _graph_command(commands, "run", _cmd_run, "run one task")
    run.add_argument("--task", help="the task to run (default: the graph's default task)")
    run.add_argument("--out", help="also write all outputs to this .npz")
    compare = _graph_command(commands, "compare", _cmd_compare, "run one input with every task")
    compare.add_argument("--output", help="the output to tabulate (default: the first)")
    generate = _graph_command(commands, "generate", _cmd_generate, "generate text", inputs=False)
    generate.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    generate.add_argument("--task", help="the task for every prompt (default: the graph's default task)")
    generate.add_argument("--tasks", help="one task per prompt, comma-separated: a batch with a task per row")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int, help="makes --sample repeatable")
    demo = commands.add_parser("demo", help="serve a page that runs every task of a classifier as you type")
    demo.add_argument("graph", help="the web form of a classifier graph (vera-export convert --to web)")
    demo.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    demo.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: 8000)")
    demo.add_argument("--js", help="the repository's runtime/js folder, after npm ci (default: found beside the"
                                   " package, $VERA_JS or ./runtime/js)")
    demo.set_defaults(func=_cmd_demo)
    bank = commands.add_parser("bank", help="a task bank: many tasks of one graph in one file")
    bank.add_argument("action", choices=["create", "add", "list", "remove", "compact"])
    bank.add_argument("bank", help="the bank file")
    bank.add_argument("items", nargs="*", metavar="ITEM", help="add: NAME=TASK_FILE ...; remove: NAME ...")
    bank.add_argument("--graph", help="create: the graph the bank is for")
    bank.add_argument("--prefix", help="list: only names that start with it")
    bank.set_defaults(func=_cmd_bank)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as exc:  # one line for every failure; the traceback only with --verbose
        if args.verbose:
            raise
        print(f"Error: {printable(_message(exc), 4000)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
