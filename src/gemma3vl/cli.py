"""The ``gemma3vl`` command line: convert, generate, chat, serve, verify, train, eval, plan, recipes, demo.

Standard output carries only results (generated text, or the verify table); progress and diagnostics go
to standard error. A bad input ends in one ``error: ...`` line naming the file/key/shape and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from gemma3vl.errors import Gemma3VLError, SettingError, on_every_rank

if TYPE_CHECKING:
    from gemma3vl.infer.sampling import Sampling
    from gemma3vl.infer.structured import Constraint

EXIT_BAD_INPUT = 2
EXIT_VERIFY_FAILED = 1
EXIT_LINES_SKIPPED = 1  # generate --batch: some lines were bad (the rest are answered)


def log(message: str) -> None:
    # One write of the line with its newline: under torchrun every rank's line then stays whole (print writes the
    # newline separately, so two ranks' errors could run together on one line).
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


SILENT_RANK_EXIT_DELAY_S = 3.0  # how long a rank that leaves an every-rank error to rank 0 waits before exiting


def launch_rank() -> int:
    """This process's rank under torchrun (``RANK``), 0 outside it."""
    return int(os.environ.get("RANK", "0") or 0)


def report_error(exc: Gemma3VLError) -> None:
    """``error: ...`` on stderr. Under torchrun (``WORLD_SIZE`` > 1) rank 0 prints it as is; another rank prints
    its own errors as ``error (rank N): ...`` and stays silent on one that every rank raised alike (rank 0 says
    it), so that a layout mistake on 64 ranks is one line, not 64."""
    rank = launch_rank()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or rank == 0:
        log(f"error: {exc}")
    elif not exc.same_on_every_rank:
        log(f"error (rank {rank}): {exc}")
    else:
        # torchrun stops every rank as soon as one exits with an error: leaving at once, this rank could get rank 0
        # (which raises the same error about now) killed before it prints it, and the job would end without a word
        time.sleep(SILENT_RANK_EXIT_DELAY_S)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (``--max-shard-size``)."""
    from gemma3vl.bridge.fsutil import parse_size as size_in_bytes

    try:
        return size_in_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_size_or_zero(text: str) -> int:
    """``parse_size``, or 0 (a setting that 0 turns off)."""
    return 0 if text.strip() == "0" else parse_size(text)


# ---------------------------------------------------------------------------------------------- convert
def cmd_convert_import(args: argparse.Namespace) -> int:
    from gemma3vl import bridge

    started = time.perf_counter()
    out = bridge.import_checkpoint(
        args.hf_dir, args.out_dir, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, progress=True
    )
    log(f"imported {args.hf_dir} -> {out} in {time.perf_counter() - started:.1f}s")
    return 0


def cmd_convert_export(args: argparse.Namespace) -> int:
    from gemma3vl import bridge

    started = time.perf_counter()
    out = bridge.export_checkpoint(
        args.native_dir,
        args.out_dir,
        layout=args.layout,
        max_shard_bytes=args.max_shard_size,
        overwrite=args.overwrite,
        progress=True,
    )
    log(f"exported {args.native_dir} -> {out} ({args.layout} layout) in {time.perf_counter() - started:.1f}s")
    return 0


def cmd_convert_merge(args: argparse.Namespace) -> int:
    """``convert merge``: base checkpoint + PEFT adapter -> a complete HF checkpoint with the adapter folded in."""
    from gemma3vl import api

    started = time.perf_counter()
    out = api.merge_adapter(args.base_dir, args.adapter_dir, args.out_dir, layout=args.layout,
                            overwrite=args.overwrite, report=log)
    log(f"merged {args.adapter_dir} into {args.base_dir} -> {out} in {time.perf_counter() - started:.1f}s")
    return 0


# ---------------------------------------------------------------------------------------------- generate
def sampling_from(args: argparse.Namespace, model_dir: Path, config) -> "Sampling":
    """Sampling for ``generate`` / ``chat``: the checkpoint's generation config, then the sampling flags."""
    from gemma3vl.infer.sampling_defaults import read_generation_defaults, resolve_sampling

    return resolve_sampling(
        read_generation_defaults(model_dir),
        config,
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        min_new_tokens=args.min_new_tokens,
    )


def checked_sampling(args: argparse.Namespace, model_dir: Path, config) -> "Sampling":
    """``sampling_from``, validated; an error names what set the value at fault: the flag (``--top-k 0 must be
    >= 1``), or else the checkpoint's ``generation_config.json``."""
    from gemma3vl.infer.prompt import processor_dir

    sampling = sampling_from(args, model_dir, config)
    try:
        sampling.validate()
    except SettingError as exc:
        if getattr(args, exc.name, None) is not None:
            raise Gemma3VLError(f"--{exc.name.replace('_', '-')} {exc.value} {exc.requirement}") from None
        raise Gemma3VLError(f"{processor_dir(model_dir) / 'generation_config.json'}: {exc}") from None
    if args.min_new_tokens is not None and args.min_new_tokens > args.max_new_tokens:
        raise Gemma3VLError(f"--min-new-tokens {args.min_new_tokens} must be at most --max-new-tokens "
                            f"{args.max_new_tokens}")
    return sampling


def check_generate_flags(args: argparse.Namespace) -> "Sampling":
    """``generate``'s sampling flags (and ``--batch-size``), checked before the model loads: a bad flag is one
    error, not a failure after loading (nor, with ``--batch``, every line skipped as bad). Returns the sampling
    they give with the checkpoint's generation config."""
    from gemma3vl import bridge

    for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p), ("--min-p", args.min_p),
                        ("--repetition-penalty", args.repetition_penalty)):
        if value is not None and not math.isfinite(value):
            raise Gemma3VLError(f"{flag} {value} must be a finite number")
    check_penalty_flags(args)
    check_device_flag(args)
    if args.min_new_tokens and (args.json or args.json_schema is not None or args.regex or args.choice):
        raise Gemma3VLError("--min-new-tokens does not go with --json / --json-schema / --regex / --choice: such an "
                            "answer ends where its grammar does")
    if args.batch_size is not None and args.batch_size < 1:
        raise Gemma3VLError(f"--batch-size {args.batch_size} must be >= 1")
    config = bridge.read_config(args.model_dir)
    sampling = checked_sampling(args, Path(args.model_dir), config)
    context = config.text.max_position_embeddings
    if args.batch is None and sampling.max_new_tokens >= context:  # no prompt fits beside it: say so before loading
        raise Gemma3VLError(f"no prompt fits: with --max-new-tokens {sampling.max_new_tokens} that is over the "
                            f"model's context of {context} (max_position_embeddings)")
    return sampling


def answer_constraint(args: argparse.Namespace) -> "Constraint | None":
    """What ``--json`` / ``--json-schema FILE`` / ``--regex PATTERN`` / ``--choice TEXT`` (repeated) ask answers to
    be (None: free text), checked before the model loads: a schema or a regular expression xgrammar cannot use is one
    error naming it."""
    from gemma3vl.infer.structured import Constraint, check_regex, load_xgrammar

    schema = json_schema_flag(args)
    if schema is not None:
        return Constraint("json", schema, "--json-schema" if args.json_schema is not None else "--json")
    if args.regex is None and not args.choice:
        return None
    load_xgrammar()  # missing: say so now, not after loading the model
    if args.choice:
        if not all(args.choice):
            raise Gemma3VLError("--choice takes non-empty strings")
        return Constraint("choice", list(args.choice), "--choice")
    try:
        check_regex(args.regex)
    except Gemma3VLError as exc:
        raise Gemma3VLError(f"--regex {args.regex!r}: {exc}") from None
    return Constraint("regex", args.regex, "--regex")


def json_schema_flag(args: argparse.Namespace) -> dict | None:
    """The JSON Schema ``--json`` (any JSON object) or ``--json-schema FILE`` asks answers to follow (None: free
    text), checked before the model loads: a file that cannot be read, is not JSON, or is not a schema xgrammar can
    use is one error naming it."""
    from gemma3vl.infer.structured import ANY_OBJECT, check_schema, load_xgrammar

    if args.json_schema is None:
        if args.json:
            load_xgrammar()  # missing: say so now, not after loading the model
            return ANY_OBJECT
        return None
    path = Path(args.json_schema)
    try:
        schema = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise Gemma3VLError(f"{path}: cannot read the JSON schema ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Gemma3VLError(f"{path}: not valid JSON ({exc})") from None
    try:
        check_schema(schema)
    except Gemma3VLError as exc:
        raise Gemma3VLError(f"{path}: {exc}") from None
    return schema


def check_device_flag(args: argparse.Namespace) -> None:
    """``--device``, checked before anything loads (``load_model`` would say the same, later)."""
    from gemma3vl.infer.loading import resolve_device

    resolve_device(args.device)


def check_penalty_flags(args: argparse.Namespace) -> None:
    """``--presence-penalty`` / ``--frequency-penalty`` in OpenAI's range, named in the error."""
    from gemma3vl.infer.sampling import MAX_OCCURRENCE_PENALTY

    for flag, value in (("--presence-penalty", args.presence_penalty), ("--frequency-penalty", args.frequency_penalty)):
        if value is not None and not -MAX_OCCURRENCE_PENALTY <= value <= MAX_OCCURRENCE_PENALTY:
            raise Gemma3VLError(f"{flag} {value} must be a number from -{MAX_OCCURRENCE_PENALTY:g} to "
                                f"{MAX_OCCURRENCE_PENALTY:g}")


def note_compile(wanted: bool, device) -> None:
    """Say what ``--compile`` will do here: compile (and that the first step takes a while) or nothing."""
    if not wanted:
        return
    if device.type == "cuda":
        log("--compile: the first decode step compiles and captures a CUDA graph (about a minute for the 4B)")
    else:
        log(f"--compile: ignored on {device} (compiled decoding needs CUDA); decoding eagerly")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from gemma3vl.infer.detokenize import IncrementalText
    from gemma3vl.infer.generate import generate
    from gemma3vl.infer.loading import load_model
    from gemma3vl.infer.prompt import build_inputs, load_image, load_processor, tokenizer_of

    if args.batch is not None:
        return cmd_generate_batch(args)
    if args.output is not None or args.batch_size is not None:
        raise Gemma3VLError("--output and --batch-size go with --batch FILE.jsonl")
    if args.prompt is None:
        raise Gemma3VLError("give --prompt TEXT (or --batch FILE.jsonl --output FILE.jsonl)")
    sampling = check_generate_flags(args)
    constraint = answer_constraint(args)
    model_dir = Path(args.model_dir)
    images = [load_image(path) for path in args.image]
    if args.adapter is not None:
        from gemma3vl.evaluation.loading import check_adapter, merge_adapter

        check_adapter(model_dir, args.adapter)
    started = time.perf_counter()
    model, config = load_model(model_dir, device=args.device, dtype=args.dtype)
    if args.adapter is not None:
        log(merge_adapter(model, args.adapter))
    processor = load_processor(model_dir, config)
    if constraint is not None:
        from gemma3vl.infer.structured import JsonGrammars

        grammars = JsonGrammars(tokenizer_of(processor), config.text.vocab_size, sampling.stop_token_ids)
        # (the answer ends where its grammar does: the checkpoint's min_new_tokens does not apply)
        sampling = replace(sampling, grammar=grammars.compile_constraint(constraint), min_new_tokens=0)
    inputs = build_inputs(
        processor, config, args.prompt, images, raw=args.raw, pan_and_scan=True if args.pan_and_scan else None
    )
    device = model.text.embed.weight.device
    log(f"loaded {model_dir} ({config.text.num_hidden_layers} layers, {next(model.parameters()).dtype}, {device}) "
        f"in {time.perf_counter() - started:.1f}s; prompt: {inputs['input_ids'].shape[1]} tokens")
    note_compile(args.compile, device)
    length, context = inputs["input_ids"].shape[1], config.text.max_position_embeddings
    if length + sampling.max_new_tokens > context:  # as --batch refuses such a line
        raise Gemma3VLError(f"the prompt is {length} tokens; with --max-new-tokens {sampling.max_new_tokens} that "
                            f"is over the model's context of {context} (max_position_embeddings)")
    stop_ids = set(sampling.stop_token_ids)
    answer = IncrementalText(tokenizer_of(processor))
    stopped = []

    def stream(tokens: torch.Tensor, finished: torch.Tensor) -> None:
        token = int(tokens[0])
        if token in stop_ids:
            stopped.append(token)
            return
        answer.add(token)
        if args.stream:
            sys.stdout.write(answer.delta())  # only text that later tokens can no longer change
            sys.stdout.flush()

    started = time.perf_counter()
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    try:
        generate(model, inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixel_values,
                 sampling=sampling, on_step=stream, compile=args.compile,
                 on_compile_failure=lambda why: log(f"--compile: compiling the decode step failed ({why[:300]}); "
                                                    f"decoding eagerly"))
    except KeyboardInterrupt:
        if args.stream:  # the text so far ends its line, so the shell's prompt and "interrupted" start their own
            sys.stdout.write(answer.delta(final=True) + "\n")
            sys.stdout.flush()
        raise
    elapsed = time.perf_counter() - started
    sys.stdout.write(answer.delta(final=True) + "\n")
    sys.stdout.flush()
    count = len(answer.token_ids) + len(stopped)  # the stop token included, as --batch and details count it
    log(f"{count} tokens in {elapsed:.2f}s ({count / max(elapsed, 1e-9):.1f} tokens/s)")
    if constraint is not None and not stopped:
        what = "JSON" if constraint.kind == "json" else constraint.param
        log(f"the answer reached --max-new-tokens {sampling.max_new_tokens} before its {what} was complete")
    return 0


def cmd_generate_batch(args: argparse.Namespace) -> int:
    """``generate --batch``: JSONL prompts in, JSONL answers out (format in gemma3vl.infer.batch)."""
    from gemma3vl.infer.batch import BatchDefaults, check_output_path, describe_summary, run_batch_file
    from gemma3vl.infer.runtime import InferenceRuntime

    if args.prompt is not None or args.image:
        raise Gemma3VLError("--batch takes prompts and images from the JSONL file; drop --prompt / --image")
    if args.stream:
        raise Gemma3VLError("--stream does not go with --batch (answers go to --output)")
    if args.output is None:
        raise Gemma3VLError("--batch needs --output FILE.jsonl")
    batch_path, output_path = Path(args.batch), Path(args.output)
    if batch_path.is_dir():
        raise Gemma3VLError(f"{batch_path}: a directory, not a prompts file (--batch names a JSONL file)")
    if not batch_path.is_file():
        raise Gemma3VLError(f"{batch_path}: no such prompts file")
    check_output_path(output_path, batch_path)
    check_generate_flags(args)
    constraint = answer_constraint(args)
    runtime = InferenceRuntime.load(args.model_dir, device=args.device, dtype=args.dtype, adapter=args.adapter)
    log(runtime.describe())
    note_compile(args.compile, runtime.device)
    defaults = BatchDefaults(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed, raw=args.raw,
                             pan_and_scan=True if args.pan_and_scan else None,
                             presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                             repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens,
                             constraint=constraint)
    started = time.perf_counter()
    summary = run_batch_file(runtime, batch_path, output_path, defaults=defaults,
                             batch_size=args.batch_size if args.batch_size is not None else 8,
                             compile=args.compile)
    log(describe_summary(summary, output_path, time.perf_counter() - started))
    return EXIT_LINES_SKIPPED if summary.skipped else 0


# ---------------------------------------------------------------------------------------------- chat
def cmd_chat(args: argparse.Namespace) -> int:
    from gemma3vl import bridge
    from gemma3vl.infer.chat import ChatSession, run_chat
    from gemma3vl.infer.runtime import InferenceRuntime

    # The flags, before the model loads (a bad one is one error, not a wait for the model first).
    check_penalty_flags(args)
    check_device_flag(args)
    check_system_flag(args.system)
    if args.max_sequence_length < 2:  # (sizes --compile's cache; nonsense either way)
        raise Gemma3VLError(f"--max-sequence-length {args.max_sequence_length} must be >= 2")
    sampling = checked_sampling(args, Path(args.model_dir), bridge.read_config(args.model_dir))
    runtime = InferenceRuntime.load(args.model_dir, device=args.device, dtype=args.dtype, adapter=args.adapter)
    log(runtime.describe())
    interactive = sys.stdin.isatty()
    if interactive:
        log("type a message; /image PATH attaches a picture to the next one, /reset, /exit, /help")
    note_compile(args.compile, runtime.device)
    session = ChatSession(runtime, sampling, system=args.system, pan_and_scan=True if args.pan_and_scan else None,
                          compile=args.compile and runtime.device.type == "cuda",
                          max_length=args.max_sequence_length, notes=log)
    return run_chat(session, sys.stdin, sys.stdout, sys.stderr, prompt="> " if interactive else "")


def check_system_flag(system: str | None) -> None:
    """``chat --system``, checked before the model loads: every turn renders it, so text the template cannot take
    would fail every message of the chat, one by one."""
    if system is None:
        return
    from gemma3vl.infer.prompt import not_text_at

    bad = not_text_at(system)
    if bad is not None:
        raise Gemma3VLError(f"--system is not UTF-8 text (character {bad + 1}); give it in UTF-8")
    for placeholder in ("<start_of_image>", "<image_soft_token>"):
        if placeholder in system:
            raise Gemma3VLError(f"--system contains {placeholder}: images are attached with /image, not written")


# ---------------------------------------------------------------------------------------------- serve
def check_listen_address(host: str, port: int) -> None:
    """Bind ``host:port`` as the server will (its address family, address reuse on), and let go: a host that does not resolve or
    is not this machine's, or a port another process listens on, is said before the model loads (minutes for a
    27B), not after. (Another process could still take the port in between; the server then says the same.)"""
    import socket

    from gemma3vl.infer.server import address_family

    with socket.socket(address_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except (OSError, OverflowError, UnicodeError) as exc:
            raise Gemma3VLError(f"cannot listen on {host}:{port}: {exc}") from None


def allowed_origins(value: str | None) -> tuple[str, ...]:
    """``--allowed-origins``: ``*``, or a comma list of web origins (``scheme://host[:port]``, as browsers send them in
    ``Origin``: no path, no trailing slash); anything else is refused, naming it."""
    if value is None:
        return ()
    origins = tuple(item.strip() for item in value.split(",") if item.strip())
    if not origins:
        raise Gemma3VLError("--allowed-origins: give '*' or origins like https://chat.example.com")
    for origin in origins:
        parsed = urllib.parse.urlsplit(origin)
        if origin != "*" and (parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path
                              or parsed.query or parsed.fragment):
            raise Gemma3VLError(f"--allowed-origins: {origin!r} is not a web origin (scheme://host[:port], no path, "
                                "as browsers send it), nor '*'")
    return origins


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from gemma3vl.infer.image_sources import ImageLimits
    from gemma3vl.infer.runtime import InferenceRuntime
    from gemma3vl.infer.server import ChatCompletionServer, ServerSettings

    for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-tokens", args.max_tokens),
                        ("--max-images", args.max_images), ("--max-image-pixels", args.max_image_pixels),
                        ("--max-waiting", args.max_waiting), ("--max-sequence-length", args.max_sequence_length),
                        ("--max-n", args.max_n)):
        if value < 1:
            raise Gemma3VLError(f"{flag} {value} must be >= 1")
    if not 0 <= args.batch_wait_ms < math.inf:
        raise Gemma3VLError(f"--batch-wait-ms {args.batch_wait_ms} must be >= 0")
    if not 0 <= args.port <= 65535:
        raise Gemma3VLError(f"--port {args.port} must be from 0 to 65535 (0 picks a free one)")
    check_device_flag(args)
    if args.allow_local_images is not None and not Path(args.allow_local_images).is_dir():
        raise Gemma3VLError(f"--allow-local-images {args.allow_local_images}: not a directory")
    origins = allowed_origins(args.allowed_origins)
    check_listen_address(args.host, args.port)
    runtime = InferenceRuntime.load(args.model_dir, device=args.device, dtype=args.dtype, adapter=args.adapter)
    log(runtime.describe())
    settings = ServerSettings(
        host=args.host, port=args.port, model_name=args.served_model_name, max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000, max_request_bytes=args.max_request_bytes, max_tokens=args.max_tokens,
        images=ImageLimits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                           max_images=args.max_images),
        allow_local_images=args.allow_local_images, allow_remote_images=args.allow_remote_images,
        pan_and_scan=True if args.pan_and_scan else None, max_waiting=args.max_waiting,
        max_sequence_length=args.max_sequence_length, compile_decode=args.compile, max_n=args.max_n,
        api_key=args.api_key or os.environ.get("GEMMA3VL_API_KEY") or None, allowed_origins=origins,
        response_store_bytes=args.response_store,
    )
    try:
        server = ChatCompletionServer(runtime, settings)
    except (OSError, OverflowError) as exc:
        raise Gemma3VLError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
        log(f"serving {server.model_name} at {server.url}/v1 (max batch {settings.max_batch_size}); Ctrl-C stops")
        if settings.api_key is not None:
            log("requests need the API key (Authorization: Bearer ...), all but /health")
        if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
            log(f"warning: listening on {args.host}, not loopback: anyone who can reach this port can use the model "
                f"(--api-key, or GEMMA3VL_API_KEY, requires a key)")
        while not stop.wait(0.5):
            pass
        log("stopping: refusing new requests, ending running generations ...")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log("stopped")
    return 0


# ---------------------------------------------------------------------------------------------- verify
def cmd_verify(args: argparse.Namespace) -> int:
    from gemma3vl import api, verify

    if args.greedy_tokens < 0:
        raise Gemma3VLError(f"--greedy-tokens {args.greedy_tokens} must be >= 0 (0 skips the greedy comparison)")
    check_device_flag(args)
    report = api.verify_checkpoint(args.model_dir, native=args.native, device=args.device, dtype=args.dtype,
                                   greedy_tokens=args.greedy_tokens)
    print(json.dumps(verify.report_dict(report)) if args.json else verify.format_report(report))
    return 0 if report.passed else EXIT_VERIFY_FAILED


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from gemma3vl import api
    from gemma3vl.train.run import run_training
    from gemma3vl.train.trainer import TrainingStopped

    if not args.recipe and not args.config:
        raise Gemma3VLError("give --recipe NAME or --config FILE (`gemma3vl recipes` lists the recipes)")
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.steps=8`: argparse took the override for --resume's optional PATH
        args.overrides, args.resume = [args.resume, *args.overrides], True
    try:  # the command line and the settings: the same on every torchrun rank
        cfg = api.training_config(args.recipe, args.config, args.overrides, model=args.model, data=args.data,
                                  eval_data=args.eval_data, out=args.out)
    except Gemma3VLError as exc:
        raise on_every_rank(exc)
    try:
        result = run_training(cfg, resume=args.resume)
    except TrainingStopped as stopped:  # SIGTERM / Ctrl-C: a checkpoint of the last whole step was saved
        if launch_rank() == 0:
            log(f"stopped: {stopped}")
        return stopped.exit_code
    if launch_rank() == 0:  # under torchrun, rank 0 alone reports
        loss = "n/a (no step ran in this run)" if result.final_loss is None else result.final_loss
        log(f"trained {result.steps} steps; final loss {loss}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from gemma3vl.train.config import RECIPE_NOTES, RECIPES

    for name, make in RECIPES.items():
        cfg = make()
        t, o, p = cfg.train, cfg.optim, cfg.peft
        adapter = f"{p.method} r{p.rank} alpha {p.alpha:g}" if p.method != "none" else "full"
        print(f"{name:20s} {adapter:18s} steps {t.steps:<5d} global batch {t.global_batch_size:<3d} "
              f"micro {t.micro_batch_size:<2d} seq {t.seq_length:<5d} lr {o.lr:g} warmup {o.warmup_steps}  "
              f"{RECIPE_NOTES.get(name, '')}")
    return 0


# ---------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    """``gemma3vl eval``: score a checkpoint on a local dataset (gemma3vl.evaluation; docs/evaluation.md)."""
    from gemma3vl.evaluation.report import format_table
    from gemma3vl.evaluation.runner import run_eval

    metrics = [name.strip() for item in args.metric for name in item.split(",") if name.strip()]
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--limit", args.limit), ("--max-sequence-length", args.max_sequence_length)):
        if value is not None and value < 1:
            raise Gemma3VLError(f"{flag} {value} must be >= 1")
    if args.max_sequence_length is not None and not args.compile:
        raise Gemma3VLError("--max-sequence-length sizes --compile's rows: give --compile too")
    report = run_eval(args.model_dir, args.data, out=args.out, layout=args.layout, metrics=metrics or None,
                      adapter=args.adapter, compare=args.compare, limit=args.limit, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, split=args.split, device=args.device, dtype=args.dtype,
                      resume=args.resume, compile=args.compile, max_sequence_length=args.max_sequence_length)
    print(format_table(report))
    log(f"predictions and report.json in {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------- plan
def cmd_plan(args: argparse.Namespace) -> int:
    from gemma3vl.parallel import plan

    if not 1 <= args.seq <= plan.MAX_SEQ:
        raise Gemma3VLError(f"--seq {args.seq}: expected 1 to {plan.MAX_SEQ:,} tokens")
    if args.gpus < 1 or not 0 < args.gpu_memory < math.inf or args.micro_batch_size < 1:
        raise Gemma3VLError("--gpus, --gpu-memory and --micro-batch-size must be positive (and finite)")
    if args.images < 0:
        raise Gemma3VLError(f"--images {args.images} must be >= 0")
    if args.global_batch_size is not None and args.global_batch_size < 1:
        raise Gemma3VLError(f"--global-batch-size {args.global_batch_size} must be >= 1")
    counts = plan.count_parameters(plan.load_config(args.model))
    options = plan.candidates(counts, args.gpus, seq=args.seq, micro_batch=args.micro_batch_size, mode=args.mode,
                              images=args.images, bf16_weights=args.bf16_weights, attention=args.attention,
                              global_batch_size=args.global_batch_size)
    if not options:  # (only --global-batch-size leaves out every layout)
        raise Gemma3VLError(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
                            f"{args.micro_batch_size} x the data-parallel ranks of any layout of {args.gpus} GPU(s): "
                            f"choose a multiple of {args.micro_batch_size} x a divisor of {args.gpus}")
    choice = plan.recommend(options, args.gpu_memory * 1e9)
    print(plan.format_plan(counts, options, choice, gpus=args.gpus, gpu_memory_gb=args.gpu_memory, seq=args.seq,
                           mode=args.mode, micro_batch=args.micro_batch_size, bf16_weights=args.bf16_weights,
                           attention=args.attention, show_all=args.all, global_batch_size=args.global_batch_size))
    return 0 if choice is not None else EXIT_VERIFY_FAILED


# ---------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from gemma3vl.demo import run_demo

    if args.steps < 1:
        raise Gemma3VLError(f"--steps {args.steps} must be >= 1")
    return run_demo(Path(args.out), seed=args.seed, steps=args.steps)


# ---------------------------------------------------------------------------------------------- parser
def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--dtype / --device, as generate has them."""
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")


EXPORT_LAYOUTS = ["source", "hub", "transformers5", "memory", "memory4", "text", "textmodel"]  # export, merge


def add_adapter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT LoRA/DoRA adapter for MODEL_DIR (OUT/adapter of gemma3vl train, or "
                             "PeftModel.save_pretrained), merged into the weights at load")


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The sampling flags of generate (read by ``sampling_from``)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help=f"at most N new tokens per answer ({max_new_tokens})")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (default: the checkpoint's sampling)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None, metavar="P",
                        help="after top-p, drop tokens less likely than P times the likeliest (0..1; 0: off)")
    parser.add_argument("--min-new-tokens", type=int, default=None, metavar="N",
                        help="no stop token (nor stop string) before N new tokens (transformers' min_new_tokens; "
                             "default: the checkpoint's generation config)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--presence-penalty", type=float, default=None, metavar="P",
                        help="subtract P from the logit of every token the answer already holds (-2..2; 0: off)")
    parser.add_argument("--frequency-penalty", type=float, default=None, metavar="F",
                        help="subtract F per time a token occurs in the answer so far (-2..2; 0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                        help="transformers' penalty on every token of the prompt and answer (> 0; 1: off; "
                             "default: the checkpoint's generation config)")


def build_parser() -> argparse.ArgumentParser:
    from gemma3vl import __version__

    parser = argparse.ArgumentParser(prog="gemma3vl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gemma3vl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert between HF checkpoints and the native format")
    direction = convert.add_subparsers(dest="direction", required=True)
    imp = direction.add_parser("import", help="HF checkpoint directory -> native directory")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), help="native shard size (5GB)")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    imp.set_defaults(func=cmd_convert_import)
    exp = direction.add_parser("export", help="native directory -> complete HF checkpoint directory")
    exp.add_argument("native_dir")
    exp.add_argument("out_dir")
    exp.add_argument("--layout", choices=EXPORT_LAYOUTS, default="source",
                     help="key layout to write (default: the one the checkpoint was imported from)")
    exp.add_argument("--max-shard-size", type=parse_size, default=None,
                     help="reshard to this size (default: the source's own file split)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    exp.set_defaults(func=cmd_convert_export)
    merge = direction.add_parser("merge", help="base checkpoint + PEFT LoRA/DoRA adapter -> merged HF checkpoint")
    merge.add_argument("base_dir", help="the adapter's base model (HF or native directory)")
    merge.add_argument("adapter_dir", help="PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("out_dir")
    merge.add_argument("--layout", choices=EXPORT_LAYOUTS,
                       default="source", help="key layout to write (default: the base's)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    merge.set_defaults(func=cmd_convert_merge)

    gen = commands.add_parser("generate", help="generate text for a prompt and images")
    gen.add_argument("model_dir", help="HF checkpoint directory or native directory")
    gen.add_argument("--prompt", default=None, help="the prompt (required unless --batch)")
    gen.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    add_sampling_options(gen, max_new_tokens=128)
    gen.add_argument("--raw", action="store_true", help="feed the prompt without the chat template")
    gen.add_argument("--pan-and-scan", action="store_true", help="add pan & scan crops of each image")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    answer_format = gen.add_mutually_exclusive_group()
    answer_format.add_argument("--json", action="store_true",
                               help="the answer is one JSON object (decoded under a grammar; needs "
                                    "pip install 'gemma3vl[structured]')")
    answer_format.add_argument("--json-schema", default=None, metavar="FILE",
                               help="the answer is JSON following the JSON Schema in FILE (as --json)")
    answer_format.add_argument("--regex", default=None, metavar="PATTERN",
                               help="the answer is a full match of this regular expression (as --json)")
    answer_format.add_argument("--choice", action="append", default=None, metavar="TEXT",
                               help="the answer is one of these strings (repeat the flag for each; as --json)")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    gen.add_argument("--batch", default=None, metavar="PROMPTS.jsonl",
                     help="answer every line of this JSONL file instead of --prompt (see the README)")
    gen.add_argument("--output", default=None, metavar="ANSWERS.jsonl", help="where --batch writes its answers")
    gen.add_argument("--batch-size", type=int, default=None, metavar="N", help="prompts decoded together with --batch: the engine's slots (8)")
    gen.add_argument("--compile", action="store_true",
                     help="CUDA: decode steps as one compiled CUDA graph (torch.compile): compiling takes about a "
                          "minute once, then each token is ~20x faster than eager (4B on an H200: 309 vs 15 tok/s); "
                          "worth it for long answers and --batch files. Ignored on the CPU")
    add_adapter_option(gen)
    gen.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="multi-turn terminal chat with images, streaming the answers")
    chat.add_argument("model_dir", help="HF checkpoint directory or native directory")
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system prompt for the conversation")
    add_sampling_options(chat, max_new_tokens=512)
    chat.add_argument("--pan-and-scan", action="store_true", help="add pan & scan crops of each image")
    chat.add_argument("--compile", action="store_true",
                      help="CUDA: decode through one compiled CUDA graph, compiled at the first answer (about a "
                           "minute for the 4B), then ~20x faster than eager. Ignored on the CPU")
    chat.add_argument("--max-sequence-length", type=int, default=8192, metavar="N",
                      help="with --compile: the positions (conversation + answer) its one KV cache holds (8192); a "
                           "longer conversation needs /reset")
    add_model_options(chat)
    add_adapter_option(chat)
    chat.set_defaults(func=cmd_chat)

    serve = commands.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/responses, /v1/completions)")
    serve.add_argument("model_dir", help="HF checkpoint directory or native directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks a free one)")
    add_model_options(serve)
    add_adapter_option(serve)
    serve.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="the model id clients use (default: the directory's name)")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (8)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="how long a request waits for others to batch with (5)")
    serve.add_argument("--max-tokens", type=int, default=2048,
                       help="the largest max_tokens a request may ask for, and the default (2048)")
    serve.add_argument("--api-key", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every route but /health (default: the "
                            "GEMMA3VL_API_KEY environment variable, which keeps the key out of the process list; "
                            "unset: no key)")
    serve.add_argument("--max-n", type=int, default=8, metavar="N",
                       help="the most choices (n) a request may ask for (8)")
    serve.add_argument("--max-request-bytes", type=parse_size, default=parse_size("64MiB"), metavar="SIZE",
                       help="largest request body (64MiB)")
    serve.add_argument("--max-image-bytes", type=parse_size, default=parse_size("20MiB"), metavar="SIZE",
                       help="largest image file (20MiB)")
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                       help="largest image, width x height (16777216)")
    serve.add_argument("--max-images", type=int, default=8, metavar="N", help="most images in one request (8)")
    serve.add_argument("--allow-local-images", default=None, metavar="DIR",
                       help="let image_url name files, confined to DIR (default: data: URLs only)")
    serve.add_argument("--allow-remote-images", action="store_true", help="let image_url be an http(s) URL")
    serve.add_argument("--response-store", type=parse_size_or_zero, default=parse_size("64MiB"), metavar="SIZE",
                       help="memory for the Responses API's kept responses (previous_response_id, GET/DELETE "
                            "/v1/responses/ID), least recently used dropped first (64MiB; 0: keep none)")
    serve.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                       help="let web pages from these origins (a comma list of scheme://host[:port], or '*') call "
                            "the server from a browser (CORS; default: none)")
    serve.add_argument("--pan-and-scan", action="store_true", help="add pan & scan crops of each image")
    serve.add_argument("--max-waiting", type=int, default=256, metavar="N",
                       help="requests that may wait for a free batch slot; more are answered 429 (256)")
    serve.add_argument("--max-sequence-length", type=int, default=4096, metavar="N",
                       help="prompt + answer tokens per request; the KV cache holds --max-batch-size of them (4096)")
    serve.add_argument("--compile", action="store_true",
                       help="CUDA: run decode steps as one compiled CUDA graph (compiled when the server starts)")
    serve.set_defaults(func=cmd_serve)

    ver = commands.add_parser("verify", help="compare our model with transformers on a synthetic batch")
    ver.add_argument("model_dir", help="HF checkpoint directory (the reference)")
    ver.add_argument("--native", default=None, help="native directory to check instead of loading MODEL_DIR")
    ver.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    ver.add_argument("--device", default="auto")
    ver.add_argument("--greedy-tokens", type=int, default=8, help="greedy tokens to compare (0: skip)")
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    ver.set_defaults(func=cmd_verify)

    train = commands.add_parser("train", help="fine-tune (full SFT or LoRA/DoRA) on image+text conversations")
    train.add_argument("--recipe", default=None,
                       help="a recipe from `gemma3vl recipes` (or recipe: NAME in the --config file)")
    train.add_argument("--config", default=None, metavar="FILE.yaml", help="settings file (YAML or JSON)")
    train.add_argument("--model", default=None, metavar="HF_OR_NATIVE_DIR",
                       help="the checkpoint to fine-tune (model.path; tiny recipes bring their own)")
    train.add_argument("--data", default=None, metavar="PATH", help="training conversations (JSONL, LLaVA, HF dataset)")
    train.add_argument("--eval-data", default=None, metavar="PATH", help="held-out conversations")
    train.add_argument("--out", default=None, metavar="DIR", help="output directory (default: ./out)")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                       help="continue from the latest checkpoint in OUT/checkpoints, or from PATH")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.steps=100 optim.lr=1e-4")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="score a checkpoint on a local dataset with the field's metrics")
    evaluate.add_argument("model_dir", help="HF checkpoint directory or native directory")
    evaluate.add_argument("--data", required=True, metavar="PATH",
                          help="parquet file, directory of parquet files, or JSONL")
    evaluate.add_argument("--layout", choices=["auto", "cord", "vqa", "caption", "conversation"], default="auto",
                          help="dataset layout (default: told from the columns)")
    evaluate.add_argument("--metric", action="append", default=[], metavar="NAME",
                          help="a metric (repeatable or comma-separated; default: the layout's own): exact_match, "
                               "token_f1, vqa_accuracy, anls, field_f1, field_precision, field_recall, "
                               "ted_accuracy, bleu4")
    evaluate.add_argument("--adapter", default=None, metavar="DIR", help="a PEFT LoRA/DoRA adapter for MODEL_DIR")
    evaluate.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N rows")
    evaluate.add_argument("--batch-size", type=int, default=8, metavar="N",
                          help="prompts generated at once: slots of the continuous-batching engine (8)")
    evaluate.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                          help="answer length limit (default: cord 512, vqa 32, caption 64, conversation 128)")
    evaluate.add_argument("--split", default=None, metavar="NAME",
                          help="with a directory of parquet files: only the files of this split (e.g. test)")
    evaluate.add_argument("--out", default="gemma3vl-eval", metavar="DIR",
                          help="where predictions.jsonl and report.json go (default: ./gemma3vl-eval)")
    evaluate.add_argument("--compare", default=None, metavar="OTHER_MODEL_DIR",
                          help="also score this checkpoint; prints both, the difference and a 95%% interval")
    evaluate.add_argument("--compile", action="store_true",
                          help="CUDA: decode through one compiled CUDA graph, compiled before the first example "
                               "(about a minute for the 4B); ignored on the CPU")
    evaluate.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                          help="with --compile: positions (prompt + answer) each compiled row holds (8192); a "
                               "longer example is reported and skipped")
    evaluate.add_argument("--resume", action="store_true",
                          help="continue the unfinished run in --out (its answers.jsonl.partial): same model, data "
                               "and settings; only the examples not yet answered are generated")
    add_model_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    recipes = commands.add_parser("recipes", help="list the training recipes and their defaults")
    recipes.set_defaults(func=cmd_recipes)

    demo = commands.add_parser("demo", help="end-to-end run on a tiny random checkpoint (no network, no GPU)")
    demo.add_argument("--out", default="gemma3vl-demo", help="working directory (default: ./gemma3vl-demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=300, metavar="N",
                      help="fine-tuning steps in step 6 (default 300; 100 already reach about 50%%)")
    demo.set_defaults(func=cmd_demo)

    planner = commands.add_parser("plan", help="estimate per-GPU training memory per layout and recommend one")
    planner.add_argument("--model", required=True, help="4b, 12b, 27b, or a checkpoint directory")
    planner.add_argument("--gpus", type=int, required=True, help="GPUs in total (all nodes)")
    planner.add_argument("--gpu-memory", type=float, required=True, metavar="GB", help="memory of one GPU (e.g. 80)")
    planner.add_argument("--seq", type=int, default=4096, help="train.seq_length, up to 131072 (default 4096)")
    planner.add_argument("--mode", choices=["sft", "peft"], default="sft", help="full SFT or LoRA r16 (default sft)")
    planner.add_argument("--micro-batch-size", type=int, default=1, help="train.micro_batch_size (default 1)")
    planner.add_argument("--images", type=int, default=1, help="images per sequence (default 1)")
    planner.add_argument("--bf16-weights", action="store_true", help="model.dtype=bfloat16 (no fp32 master copy)")
    planner.add_argument("--attention", choices=["flex", "sdpa"], default="flex",
                         help="flex: model.attention=auto on CUDA, no [T, T] mask (default); sdpa: dense masks")
    planner.add_argument("--global-batch-size", type=int, default=None,
                         help="train.global_batch_size: sets the pipeline's micro-batches (default: 4 x pp of them)")
    planner.add_argument("--all", action="store_true",
                         help="show every checkpointing mode of the context- and pipeline-parallel layouts too")
    planner.set_defaults(func=cmd_plan)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``train``'s ``section.key=value`` overrides may also come after options
    (``train --recipe r train.steps=8 --data X optim.lr=1e-4``): argparse takes only the first run of them as the
    positional list and calls the rest unrecognized. They are appended in the order given (a later one wins)."""
    args, extras = parser.parse_known_args(argv)
    if extras and isinstance(getattr(args, "overrides", None), list):
        stray = [token for token in extras if token.startswith("-") or "=" not in token]
        if not stray:
            args.overrides = [*args.overrides, *extras]
            return args
        extras = stray
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = parse_arguments(build_parser(), argv)  # (Ctrl-C at once: "interrupted", not a traceback)
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is handled below, not at exit
        return code
    except Gemma3VLError as exc:
        report_error(exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`gemma3vl recipes | head`): stop quietly, as Unix tools do. stdout is pointed at
        # /dev/null so that flushing it at exit does not fail again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a descriptor (a test's capture)
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe


if __name__ == "__main__":
    raise SystemExit(main())
