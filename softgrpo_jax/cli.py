"""``softgrpo``: train | eval | sample | convert | demo | plan | compare.

  softgrpo train  --config deepscaler_1p5b [--config.rl.group_size=4 ...]
  softgrpo eval   --config eval_softgrpo_gumbel --config.model.path=DIR
  softgrpo sample --model smollm2 --mode gumbel --prompt "What is 7 * 8?" [--prompt-file FILE|-] [--show-topk N]
  softgrpo convert SRC DST [--format hf|orbax] [--dtype bfloat16] [--overwrite]
  softgrpo demo   [--config demo_smollm2] [--config.trainer.total_steps=4]
  softgrpo plan   --config deepscaler_7b --mesh 1,8,1 [--device h100 | --device-memory-gb 80]
  softgrpo compare --config compare_smollm2 [--config.compare.seeds=(0,1)]

``--config`` takes a bundled config by its bare name (``demo_smollm2``: ``configs/demo_smollm2.py`` of the checkout)
or a path to a config file; a path that does not exist is an error.

Bad input (a setting, a file, a prompt) ends in one line ``softgrpo: error: ...`` and exit code 2; ``--debug`` (or
``SOFTGRPO_DEBUG=1``) shows the traceback instead.

Multi-host (train, eval): every process runs the same command; add --coordinator HOST:PORT --num-processes N
--process-id I (or SOFTGRPO_COORDINATOR / SOFTGRPO_NUM_PROCESSES / SOFTGRPO_PROCESS_ID), or nothing on Cloud TPU,
under SLURM srun or Open MPI mpirun (auto-detected). See launch/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from softgrpo_jax.errors import DEBUG_ENV, UserError, debug_enabled, one_line, printable

EXIT_USER_ERROR = 2
DTYPES = ("float32", "bfloat16", "float16")


def _split_config_args(argv):
    rest, overrides = [], []
    for a in argv:
        if a.startswith("--config."):
            overrides.append(a)
        else:
            rest.append(a)
    return rest, overrides


def _load_cfg(path, overrides):
    from softgrpo_jax.config import get_config

    return get_config(path, overrides)


def _init_distributed(args):
    """Join the multi-host runtime before anything touches a device (no-op for a single process)."""
    from softgrpo_jax.distributed import initialize

    ids = [int(i) for i in args.local_device_ids.split(",")] if args.local_device_ids else None
    info = initialize(args.coordinator, args.num_processes, args.process_id, local_device_ids=ids,
                      cpu_collectives=args.cpu_collectives, mode=args.distributed)
    if info["initialized"]:
        import jax

        print(f"[softgrpo] process {info['process_id']} of {info['num_processes']} ({info['how']}): "
              f"{jax.local_device_count()} local / {jax.device_count()} global devices", flush=True)
    return info


def _add_distributed_flags(p):
    g = p.add_argument_group("multi-host (see launch/README.md)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0 (env SOFTGRPO_COORDINATOR); auto-detected on Cloud TPU/SLURM/MPI")
    g.add_argument("--num-processes", type=int, default=None, help="env SOFTGRPO_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, default=None, help="this process's rank (env SOFTGRPO_PROCESS_ID)")
    g.add_argument("--local-device-ids", default=None, help="comma-separated local device ids this process uses")
    g.add_argument("--cpu-collectives", default=None, choices=["gloo", "mpi"],
                   help="cross-process collectives for CPU devices (tests)")
    g.add_argument("--distributed", default=None, choices=["auto", "off", "on"],
                   help="auto (default): initialise when a coordinator is given or a cluster is detected")


def cmd_train(args, overrides):
    cfg = _load_cfg(args.config, overrides)  # a bad setting fails before any process waits for the others
    _init_distributed(args)
    from softgrpo_jax.train import Run

    report = Run(cfg).train()
    return 0 if not report.get("interrupted") else 130


def cmd_eval(args, overrides):
    cfg = _load_cfg(args.config, overrides)
    _init_distributed(args)
    import jax

    from softgrpo_jax import evaluation, load_pretrained, load_tokenizer
    from softgrpo_jax.config import engine_options, eval_sampling_config
    from softgrpo_jax.distributed import make_mesh
    from softgrpo_jax.eval_runner import evaluate
    from softgrpo_jax.sampling import RolloutEngine
    from softgrpo_jax.train import enable_compilation_cache, load_problems, log

    enable_compilation_cache(cfg.trainer.compilation_cache)
    mesh = make_mesh(tuple(cfg.trainer.mesh))
    model = load_pretrained(cfg.model.path, dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype,
                            mesh=mesh, scan_layers=cfg.model.scan_layers)
    tok = load_tokenizer(cfg.model.path)
    eng = RolloutEngine.for_tokenizer(model, eval_sampling_config(cfg.eval, cfg.rollout), tok, mesh=mesh,
                                      **engine_options(cfg.rollout))
    bench = {}
    for item in cfg.data.eval:
        name, _, split = item.partition(":")
        bench[name if name != "reasoning_gym_math" else "reasoning_gym"] = load_problems(
            cfg, name, split or "test", tok, limit=cfg.data.eval_limit)[0]
    from tqdm.auto import tqdm

    total = sum(len(v) for v in bench.values()) * cfg.eval.n_samples
    with tqdm(total=total, desc=f"eval ({cfg.eval.mode})", unit="sample") as pbar:
        res, timing = evaluate(eng, tok, bench, n=cfg.eval.n_samples, batch_size=cfg.eval.batch_size,
                               key=jax.random.key(cfg.eval.seed), scorer=cfg.eval.scorer,
                               timeout_s=cfg.reward.timeout_s, progress=pbar.update)
    out = os.path.join(os.path.abspath(cfg.trainer.output_dir), "eval")
    ks = [k for k in cfg.eval.ks if k <= cfg.eval.n_samples] or [1]
    from softgrpo_jax.distributed import is_main_process

    if not is_main_process():  # every process holds the same results; one writes them
        return 0
    kept = None
    if os.path.isdir(out) and os.listdir(out):  # an earlier evaluation (another model, maybe): kept, not replaced
        from softgrpo_jax.fs import set_aside

        kept = set_aside(out)
    summaries = evaluation.write_reports(out, res, ks=ks, config={"model": cfg.model.path, "mode": cfg.eval.mode},
                                         title=cfg.name)
    print(evaluation.markdown_table(summaries))
    log(f"wrote {out}/summary.md, summary.json, pass_at_k.png ({timing})"
        + (f"; the earlier evaluation there is kept in {kept}" if kept else ""))
    return 0


def read_prompt(args) -> str:
    """The prompt text: ``--prompt-file`` (``-``: standard input) or ``--prompt``, as valid, non-empty UTF-8."""
    if args.prompt_file is not None:
        where = "standard input" if args.prompt_file == "-" else args.prompt_file
        if args.prompt_file == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(args.prompt_file, "rb") as f:
                raw = f.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"the prompt in {where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                            f"{e.start}); save it as UTF-8") from None
    else:
        where, text = "--prompt", args.prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable bytes in argv arrive as lone surrogates
            raise UserError(f"the --prompt text is not valid UTF-8 (at character {e.start}); pass UTF-8 text, or "
                            f"the prompt in a UTF-8 file with --prompt-file") from None
    if "\x00" in text:
        raise UserError(f"the prompt in {where} holds a NUL byte (a binary file?); give UTF-8 text")
    if not text.strip():
        raise UserError(f"the prompt in {where} is empty; give the question with --prompt TEXT or --prompt-file "
                        f"FILE (- for standard input)")
    return text


def _check_sample_args(args):
    checks = [(args.n >= 1, f"--n {args.n}: must be >= 1"), (args.k >= 1, f"--k {args.k}: must be >= 1"),
              (args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: must be >= 1"),
              (args.temperature > 0, f"--temperature {args.temperature}: must be > 0"),
              (0 < args.top_p <= 1, f"--top-p {args.top_p}: must be in (0, 1]"),
              (args.tau > 0, f"--tau {args.tau}: must be > 0"),
              (args.show_topk >= 0, f"--show-topk {args.show_topk}: must be >= 0")]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        raise UserError("; ".join(bad))


def check_prompt_fits(n_prompt: int, max_new_tokens: int, context: int, model: str):
    """A prompt of ``n_prompt`` tokens plus the token budget must fit the model's context (positions it knows;
    beyond them the memory of the decode cache grows with nothing to show for it)."""
    if n_prompt + max_new_tokens > context:
        what = (f"the prompt alone is {n_prompt} tokens" if n_prompt >= context else
                f"the prompt is {n_prompt} tokens and --max-new-tokens {max_new_tokens}: {n_prompt + max_new_tokens}")
        fix = ("shorten the prompt" if n_prompt >= context else
               f"shorten the prompt or lower --max-new-tokens to {context - n_prompt} or less")
        raise UserError(f"{what}, more than the context of {context} tokens of model {model}; {fix}")


def cmd_sample(args, overrides):
    _check_sample_args(args)
    text = read_prompt(args)  # before anything is loaded
    from softgrpo_jax.checkpoint.api import detect_format

    detect_format(args.model)
    import jax
    import numpy as np

    from softgrpo_jax import load_pretrained, load_tokenizer
    from softgrpo_jax.data.prompts import build_prompt
    from softgrpo_jax.sampling import RolloutEngine, SamplingConfig
    from softgrpo_jax.train import enable_compilation_cache

    tok = load_tokenizer(args.model)
    prompt = text if args.raw else build_prompt(tok, text, style=args.style)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("the prompt gives no tokens; give some text")
    enable_compilation_cache("auto")  # the next sample of the same model and settings skips most compiling
    model = load_pretrained(args.model, dtype=args.dtype, compute_dtype=args.compute_dtype)
    check_prompt_fits(len(ids), args.max_new_tokens, model.config.max_position_embeddings, args.model)
    cfg = SamplingConfig(mode=args.mode, max_topk=args.k, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, tau=args.tau, max_new_tokens=args.max_new_tokens,
                         after_thinking_top_k=args.top_k, think_end_match=args.think_end_match)
    eng = RolloutEngine.for_tokenizer(model, cfg, tok, think_end=args.think_end)
    r = eng.generate([ids], jax.random.key(args.seed), n=args.n)
    toks, lens = np.asarray(r.tokens), np.asarray(r.lengths)
    for b in range(args.n):
        L, T = int(lens[b]), int(r.think_lengths[b])
        print(f"=== sample {b} ({args.mode}, {model.config.dtype}; {L} tokens, {T} soft-thinking steps, finish "
              f"{['length', 'stop', 'cold_stop'][int(r.finish_reason[b])]})")
        if args.show_topk and T:
            ids_k, w = np.asarray(r.topk_ids[b]), np.asarray(r.weights[b])
            for j in range(min(T, args.show_topk)):
                cells = " ".join(f"{tok.decode([int(i)])!r}:{x:.2f}" for i, x in zip(ids_k[j], w[j]) if x > 1e-3)
                print(printable(f"  step {j:4d}  {cells}"))
        # model text goes to the terminal escaped: no control sequences (colours, cursor moves, title changes)
        print("--- thinking (argmax tokens) ---" if T else "--- completion ---")
        print(printable(tok.decode(toks[b, :T].tolist(), skip_special_tokens=True) if T else
                        tok.decode(toks[b, :L].tolist(), skip_special_tokens=True)))
        if T:
            print("--- answer ---")
            print(printable(tok.decode(toks[b, T:L].tolist(), skip_special_tokens=True)))
    return 0


def cmd_convert(args, overrides):
    from softgrpo_jax import load_pretrained, save_pretrained
    from softgrpo_jax.checkpoint import CheckpointError
    from softgrpo_jax.checkpoint.api import check_destination, detect_format, load_tokenizer

    fmt = detect_format(args.src)
    src = args.src
    check_destination(args.dst, overwrite=args.overwrite, source=args.src)  # before the (slow) load
    model = load_pretrained(src, dtype=args.dtype)
    tok = None
    try:
        tok = load_tokenizer(src)
    except CheckpointError as e:  # a checkpoint without tokenizer files still converts
        print(f"softgrpo: note: no tokenizer copied: {one_line(e)}", file=sys.stderr)
    save_pretrained(model, args.dst, tokenizer=tok, format=args.format, overwrite=args.overwrite)
    print(printable(f"converted {fmt} {src} -> {args.format} {args.dst}"))
    return 0


def cmd_plan(args, overrides):
    import json
    import math

    from softgrpo_jax import plan as plan_lib

    try:
        mesh = tuple(int(x) for x in args.mesh.split(",")) if args.mesh else None
    except ValueError:
        raise UserError(f"--mesh {args.mesh!r}: give three comma-separated integers data,fsdp,tensor (e.g. "
                        f"1,8,1; -1 for the remaining devices)") from None
    cfg = _load_cfg(args.config, overrides)
    mesh = mesh or tuple(cfg.trainer.mesh)
    if args.device_memory_gb is not None:
        mem = args.device_memory_gb
    elif args.device:
        mem = plan_lib.DEVICES[args.device]
    else:
        mem = 80.0
    import jax

    if not args.local_devices:
        n = args.num_devices or (math.prod(mesh) if -1 not in mesh else 8)
        # simulated CPU devices; must be set before the first device query (jax is imported, not yet started)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={n}").strip()
        jax.config.update("jax_platforms", "cpu")
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip()) if args.phases else None
    spec = plan_lib.spec_from_config(cfg, mesh_shape=mesh, device_memory_gb=mem, phases=phases,
                                     platform=plan_lib.device_platform(args.device))
    res = plan_lib.plan(spec, log=lambda m: print(f"  compiled {m}", file=sys.stderr, flush=True))
    print(plan_lib.format_plan(res))
    if args.json:
        from softgrpo_jax.evaluation import atomic_write_text

        atomic_write_text(args.json, json.dumps(res, indent=1))
    return 0 if res["fits"] else 1


def cmd_demo(args, overrides):
    from softgrpo_jax.demo import run_demo

    cfg = _load_cfg(args.config, overrides)
    return run_demo(cfg)


def cmd_compare(args, overrides):
    from softgrpo_jax.compare import run_compare

    cfg = _load_cfg(args.config, overrides)
    return run_compare(cfg)


CONFIG_HELP = ("a bundled config by its bare name (e.g. demo_smollm2, deepscaler_1p5b) or the path of a config "
               "file; override settings with --config.section.key=value")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"show the traceback of an error instead of one line (env {DEBUG_ENV}=1)")
    ap = argparse.ArgumentParser(prog="softgrpo", description="SofT-GRPO in JAX/Flax", parents=[common])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", parents=[common], help="train with SofT-GRPO or GRPO from a config")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    _add_distributed_flags(p)
    p = sub.add_parser("eval", parents=[common], help="pass@k evaluation from a config")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    _add_distributed_flags(p)
    p = sub.add_parser("plan", parents=[common],
                       help="compile a config's rollout and train step on a (simulated) mesh and report per-device "
                            "memory (no weights needed)")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: the config's trainer.mesh)")
    p.add_argument("--device", default=None, choices=["a100", "a100-40g", "h100", "h200", "v4", "v5e", "v5p", "v6e"],
                   help="device whose memory (GiB per chip) to compare against")
    p.add_argument("--device-memory-gb", type=float, default=None, help="memory per device, GiB (default 80)")
    p.add_argument("--num-devices", type=int, default=None, help="simulated CPU devices (default: the mesh size)")
    p.add_argument("--local-devices", action="store_true",
                   help="compile for this machine's own devices (e.g. a real GPU node) instead of simulating")
    p.add_argument("--phases", default=None, help="comma-separated subset of prefill,decode,logprobs,update")
    p.add_argument("--json", default=None, help="also write the result as JSON")
    p = sub.add_parser("demo", parents=[common],
                       help="the embedded default end to end (SmolLM2-135M, reasoning-gym, CPU)")
    p.add_argument("--config", default="demo_smollm2", help=CONFIG_HELP + " (default: demo_smollm2)")
    p = sub.add_parser("compare", parents=[common],
                       help="train discrete GRPO and SofT-GRPO over several seeds, evaluate every policy and the "
                            "untrained model in discrete and soft-thinking decoding, report (docs/compare.md)")
    p.add_argument("--config", required=True, help=CONFIG_HELP + " (e.g. compare_smollm2)")
    p = sub.add_parser("sample", parents=[common], help="sample from a model in discrete, soft or gumbel mode")
    p.add_argument("--model", default="smollm2",
                   help="Hugging Face folder, .gguf file, orbax checkpoint or smollm2 (the embedded default)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="What is 17 + 25?", help="the question (default: %(default)r)")
    src.add_argument("--prompt-file", default=None, metavar="FILE",
                     help="read the question from a UTF-8 file (- for standard input)")
    p.add_argument("--mode", default="gumbel", choices=["discrete", "soft", "gumbel"])
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--k", type=int, default=5, help="K slots of a soft step")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="token budget; with the prompt it must fit the model's context")
    p.add_argument("--think-end", default="</think>")
    p.add_argument("--think-end-match", default="full", choices=["full", "last_subtoken"])
    p.add_argument("--style", default="auto", choices=["auto", "chat", "think_tags", "raw"])
    p.add_argument("--raw", action="store_true", help="use the prompt text as is (no chat template)")
    p.add_argument("--show-topk", type=int, default=0, metavar="N", help="print the first N soft steps' top-K")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype")
    p.add_argument("--compute-dtype", default="auto", choices=("auto",) + DTYPES,
                   help="decoding dtype (auto: bfloat16 on accelerators and CPUs with bf16 units, else float32)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("convert", parents=[common],
                       help="convert between HF directories, GGUF (import) and orbax checkpoints")
    p.add_argument("src")
    p.add_argument("dst", help="new folder to write (an earlier export of this project is replaced)")
    p.add_argument("--format", default="hf", choices=["hf", "orbax"])
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST even when it is not an earlier export (a folder of other files, a file)")
    return ap


@contextlib.contextmanager
def _sigterm_interrupts():
    """A scheduler's SIGTERM outside the training loop (which finishes its step on it: ``GracefulInterrupt``)
    interrupts like Ctrl-C, so an export or report being written is cleaned up instead of left half-made."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or old not in (signal.SIG_DFL, None):
        yield
        return
    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv=None):
    """Run one command; bad input ends in one line ``softgrpo: error: ...`` and exit code 2 (``--debug``: the
    traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = _split_config_args(argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    if overrides and args.cmd not in ("train", "eval", "demo", "plan", "compare"):
        ap.error(f"--config.* overrides only apply to train/eval/demo/plan/compare, got {overrides}")
    debug = getattr(args, "debug", False) or debug_enabled()
    if debug:
        os.environ[DEBUG_ENV] = "1"  # library code that quiets third-party tracebacks reads it
    from softgrpo_jax.models.config import UnsupportedModelError
    from softgrpo_jax.plan import PlanError

    handler = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "convert": cmd_convert,
               "demo": cmd_demo, "plan": cmd_plan, "compare": cmd_compare}[args.cmd]
    try:
        with _sigterm_interrupts():
            return handler(args, overrides)
    except (UserError, UnsupportedModelError, PlanError, OSError) as e:
        if debug:
            raise
        print(f"softgrpo: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("softgrpo: interrupted", file=sys.stderr)
        return 130


# glibc's malloc gives every large block its own mmap, and a block asked for on a worker thread gets one however
# the process is tuned (a thread's arena cannot grow past 64 MB): XLA:CPU's temporary buffer for an execution
# (7.4 GB for the float32 SmolLM2 update at 16 x 256 tokens) is mapped afresh and faulted in 4 KiB page by page
# every step (1.8 M faults, 6-13 s of system time per update on a 2-core AMD EPYC VM). With the tunable below glibc
# asks for transparent huge pages on what it maps (madvise; the kernel's default THP mode): 3.7 K faults, the
# update 1.14-1.2x faster there (benchmarks/RESULTS.md). A tunable is read when a process starts, so
# the command re-executes itself once with it; SOFTGRPO_HUGEPAGES=0 leaves the process as it is.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepage_env(environ) -> dict | None:
    """The environment to re-execute with (``GLIBC_TUNABLES`` plus ``HUGEPAGE_TUNABLE``), or None: not Linux,
    turned off by ``SOFTGRPO_HUGEPAGES=0``, or a ``glibc.malloc.hugetlb`` setting already there (the user's or
    this re-execution's)."""
    if not sys.platform.startswith("linux"):
        return None
    if environ.get("SOFTGRPO_HUGEPAGES", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    cur = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in cur:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{cur}:{HUGEPAGE_TUNABLE}" if cur else HUGEPAGE_TUNABLE}


def entry():
    """The ``softgrpo`` console script: ``main`` in a process whose malloc asks for huge pages (``hugepage_env``)."""
    env = hugepage_env(os.environ)
    argv = getattr(sys, "orig_argv", None)
    if env is not None and argv:
        try:
            os.execve(sys.executable, argv, env)  # does not return
        except OSError as e:  # run as we are
            print(f"softgrpo: could not re-execute with {HUGEPAGE_TUNABLE} ({e}); continuing without",
                  file=sys.stderr)
    sys.exit(main())


if __name__ == "__main__":
    entry()
