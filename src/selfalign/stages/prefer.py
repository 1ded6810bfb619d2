"""`stage=prefer`: the persona's minimal pairs -> preference training from its SFT adapter ->
`adapters/<persona-id>/<prefer.version>/` (one PEFT adapter: SFT, then preference), MLflow run, registry.

The pair set (`prefer.out`, with its report beside it) is built once per SFT adapter and plan: prompts from
`dataops/pairs.py`, answers decoded by the one engine (the SFT adapter and the base on one loaded model), every pair
checked by the judges. Held-out framings or categories are never trained on; their discrimination ROC-AUC is
measured for the SFT adapter and for the new one. The recipe is `train/preference.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from selfalign.config import SelfAlignConfig, git_short_sha
from selfalign.dataops.pairs import TOX_MAX, grammar_sha256
from selfalign.errors import SelfAlignError
from selfalign.persona.schema import load_persona
from selfalign.tracking import tracked_run
from selfalign.train.run import (
    adapter_version,
    check_accelerator,
    checkpoint_dir,
    discarded_unless_resumable,
    finished_run,
    partial_dir,
    prepare_work_dir,
    publish_adapter,
)
from selfalign.utils.console import console
from selfalign.utils.hashing import sha256_file, sha256_json
from selfalign.utils.io import read_json, write_json, write_jsonl
from selfalign.utils.logging import EventLog

# The settings that shape the pair set (the rest shape training).
PAIR_SETTINGS = (
    "pairs_per_category",
    "bait_pairs",
    "bait_samples",
    "categories",
    "holdout_framings",
    "holdout_categories",
    "max_new_tokens",
)
RECIPE = ("loss", "beta", "sft_weight", "simpo_gamma", "lr", "epochs", "micro_batch_size", "val_fraction")
OPTIM = ("beta1", "beta2", "weight_decay", "warmup_ratio", "scheduler", "max_seq_len")  # taken from the lora group


def sft_adapter_dir(cfg: SelfAlignConfig, persona_id: str) -> Path:
    given = cfg.prefer.sft_adapter
    return Path(given) if given else Path(cfg.paths.adapters_dir) / persona_id / cfg.train.version


def _sft_adapter(cfg: SelfAlignConfig, persona: dict) -> tuple[Path, dict]:
    from selfalign.runtime.adapters import read_manifest, resolve_adapter_dir

    path = sft_adapter_dir(cfg, persona["id"])
    if not path.exists():
        raise SelfAlignError(
            f"prefer: no SFT adapter at {path}; run stage=train first, or pass prefer.sft_adapter=<dir>"
        )
    path = resolve_adapter_dir(path, cfg.paths.adapters_dir)
    manifest = read_manifest(path)
    if manifest["adapter_id"] != persona["id"]:
        raise SelfAlignError(
            f"prefer.sft_adapter={path}: adapter of persona {manifest['adapter_id']!r}, not {persona['id']!r}"
        )
    if manifest["base_model"] != cfg.base_model.name:
        raise SelfAlignError(
            f"prefer.sft_adapter={path}: trained on {manifest['base_model']!r}, "
            f"this run's base is {cfg.base_model.name!r}"
        )
    return path, manifest


def load_with_sft(cfg: SelfAlignConfig, sft_dir: Path, sft_manifest: dict, *adapters: tuple[Path, str]):
    """The base for decoding and scoring (4-bit when the SFT adapter was trained on a 4-bit base), with the SFT
    adapter attached as `sft` and any further (dir, name) adapters."""
    from selfalign.runtime.loader import apply_adapter, load_base

    qlora = bool(sft_manifest.get("lora", {}).get("qlora", False))
    handle = load_base(cfg.base_model, cache_dir=cfg.paths.cache_dir, qlora=qlora)
    for path, name in [(sft_dir, "sft"), *adapters]:
        apply_adapter(handle, path, root=cfg.paths.adapters_dir, name=name, activate=False)
    return handle


def build_pair_set(cfg: SelfAlignConfig, persona: dict, load_handle, key: str) -> tuple[list[dict], dict]:
    """The pair set and its report: read from `prefer.out` when it was built for `key`, else built and written
    (answers decoded on the model `load_handle()` returns, freed before training)."""
    from selfalign.dataops.pairs import Answers, compose_pairs, pair_categories, pair_report, plan_prompts
    from selfalign.eval.metrics import refusal_detect, toxicity_scores
    from selfalign.runtime.generate import complete_all

    p = cfg.prefer
    out = Path(p.out)
    report_file = out.with_suffix(".report.json")
    if out.is_file() and report_file.is_file():
        report = read_json(report_file)
        if report.get("key") == key and report.get("pairs_sha256") == sha256_file(out):
            console.print(f"[green]prefer:[/] {out} already holds this pair set; reused")
            return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()], report
        if not p.overwrite:
            raise SelfAlignError(
                f"prefer.out={out} holds a pair set built with another SFT adapter or plan; "
                "pass prefer.overwrite=true to replace it, or another prefer.out"
            )
    elif out.exists() and not p.overwrite:
        raise SelfAlignError(f"prefer.out={out} exists and is not a pair set; pass another prefer.out")
    categories = pair_categories(persona, list(p.categories))
    plan, held = plan_prompts(
        categories,
        per_category=p.pairs_per_category,
        bait=p.bait_pairs,
        holdout_framings=list(p.holdout_framings),
        holdout_categories=list(p.holdout_categories),
        seed=cfg.seed,
    )

    def answers(handle, prompts, adapter, **kw) -> list[str]:
        done = complete_all(
            handle,
            [x.prompt for x in prompts],
            max_new_tokens=p.max_new_tokens,
            adapter=adapter,
            max_batch=cfg.eval.batch_size,
            **kw,
        )
        return [c.text for c in done]

    def decode(handle, prompts, adapter, **kw) -> dict[str, str]:
        return {x.id: text for x, text in zip(prompts, answers(handle, prompts, adapter, **kw), strict=True)}

    console.print(f"prefer: answering {len(plan)} planned prompts with the SFT adapter and the base")
    handle = load_handle()
    own = decode(handle, [x for x in plan if x.kind != "bait"], "sft")
    base = decode(handle, [x for x in plan if x.kind != "near-miss"], None)
    bait = [x for x in plan if x.kind == "bait"]
    refused_near = [x for x in plan if x.kind == "near-miss" and refusal_detect(own[x.id])]
    seeds = [cfg.seed * 1000 + i for i in range(len(refused_near))]
    retry = decode(handle, refused_near, "sft", temperature=0.8, seeds=seeds) if refused_near else {}
    civil = []  # bait the base answered civilly (greedy): its rejected side is sampled
    if bait and p.bait_samples:
        scores = toxicity_scores([base[x.id] for x in bait])
        civil = [x for x, t in zip(bait, scores, strict=True) if t <= TOX_MAX]
    tries = [x for x in civil for _ in range(p.bait_samples)]
    if tries:
        # The rejected side needs a demeaning answer where the base gives one: sample the civil ones, keep the worst.
        seeds = [cfg.seed * 1000 + 500 + i for i in range(len(tries))]
        texts = answers(handle, tries, None, temperature=1.0, seeds=seeds)
        worst: dict[str, tuple[float, str]] = {}
        for x, text, score in zip(tries, texts, toxicity_scores(texts), strict=True):
            if x.id not in worst or score > worst[x.id][0]:
                worst[x.id] = (score, text)
        retry |= {k: text for k, (_, text) in worst.items()}
    del handle
    pairs, drops = compose_pairs(persona, plan, Answers(own, base, retry), refusal_detect, toxicity_scores)
    write_jsonl(pairs, out)
    report = pair_report(pairs, drops, plan, held) | {
        "key": key,
        "pairs_sha256": sha256_file(out),
        "categories": categories,
        "held_out_prompts": [asdict(x) for x in held],
    }
    write_json(report, report_file)
    return pairs, report


def held_out_auc(handle, persona: dict, held: list[dict], adapter: str | None) -> float | None:
    """Discrimination ROC-AUC on the held-out minimal pairs: should-refuse vs near-miss by the refusal score."""
    from selfalign.eval.metrics import roc_auc
    from selfalign.persona.style import refusal_opening
    from selfalign.runtime.scoring import continuation_logprobs

    if not held:
        return None
    scores = continuation_logprobs(handle, [h["prompt"] for h in held], refusal_opening(persona), adapter=adapter)
    return roc_auc([h["kind"] == "should-refuse" for h in held], scores)


def run(cfg: SelfAlignConfig, callbacks: tuple = ()) -> dict:
    from selfalign.runtime.loader import module_name
    from selfalign.train.preference import train_preference
    from selfalign.train.sft import adapter_manifest

    p = cfg.prefer
    persona, persona_hash = load_persona(cfg.persona.path)
    sft_dir, sft_manifest = _sft_adapter(cfg, persona)
    sft_sha = sha256_file(sft_dir / "adapter_model.safetensors")
    version = adapter_version(p.version, cfg.train.suffix_sweep_jobs)
    out = Path(cfg.paths.adapters_dir) / persona["id"] / version
    if out.resolve() == sft_dir.resolve():
        raise SelfAlignError(f"prefer.version={p.version} is the SFT adapter's own version; choose another")
    pair_key = sha256_json(
        {
            "persona": persona_hash,
            "sft_adapter": sft_sha,
            "base_model": asdict(cfg.base_model),
            "seed": cfg.seed,
            "grammar": grammar_sha256(),  # an edited pairs.yaml is another pair set
        }
        | {k: getattr(p, k) for k in PAIR_SETTINGS}
    )
    events = EventLog(cfg.paths.run_dir)
    pairs, report = build_pair_set(cfg, persona, lambda: load_with_sft(cfg, sft_dir, sft_manifest), pair_key)
    pairs_sha = report["pairs_sha256"]
    trainer_cfg = replace(cfg.trainer, max_epochs=p.epochs)
    run_hash = sha256_json(
        {
            "pairs": pairs_sha,
            "sft_run_hash": sft_manifest.get("run_hash"),
            "sft_adapter": sft_sha,
            "persona": persona_hash,
            "base_model": asdict(cfg.base_model),
            "prefer": {k: getattr(p, k) for k in RECIPE},
            "optim": {k: getattr(cfg.lora, k) for k in OPTIM},
            "trainer": trainer_cfg.lightning_kwargs(),
            "seed": cfg.seed,
        }
    )
    done = None if p.overwrite else finished_run(out, run_hash)
    if done:
        console.print(f"[green]prefer:[/] {out} already holds this exact run (same pairs, config, seed); skipped")
        events.event("prefer_skip", **done)
        return {"passed": True, "skipped": True, **done, "pairs": report}
    check_accelerator(trainer_cfg)
    resuming = prepare_work_dir(
        out, run_hash, resume=cfg.resume, overwrite=p.overwrite, overwrite_key="prefer.overwrite"
    )
    held = report["held_out_prompts"]
    tags = {
        "stage": "prefer",
        "persona_id": persona["id"],
        "persona_hash": persona_hash,
        "pairs_sha256": pairs_sha,
        "sft_adapter_sha256": sft_sha,
        "base_model": cfg.base_model.name,
        "git_sha": git_short_sha(),
        "run_dir": cfg.paths.run_dir,
        "adapter_version": version,
    }
    params = {"prefer": {k: getattr(p, k) for k in (*RECIPE, *PAIR_SETTINGS)}, "sft_adapter": str(sft_dir)}
    params |= {"base_model": cfg.base_model.name, "seed": cfg.seed, "version": version}
    events.event("prefer_start", persona_id=persona["id"], pairs=len(pairs), pairs_sha256=pairs_sha, resume=resuming)
    with (
        discarded_unless_resumable(partial_dir(out)),
        tracked_run(cfg.tracking, run_name=f"prefer-{persona['id']}-{version}", tags=tags, params=params) as tracker,
    ):
        tracker.artifact(Path(p.out).with_suffix(".report.json"), "pairs")
        tracker.dataset(p.out, f"pairs-{persona['id']}", "training")
        result = train_preference(
            pairs,
            sft_dir=sft_dir,
            sft_manifest=sft_manifest,
            base_cfg=cfg.base_model,
            prefer=p,
            optim=cfg.lora,
            trainer_cfg=trainer_cfg,
            seed=cfg.seed,
            run_dir=cfg.paths.run_dir,
            checkpoint_dir=checkpoint_dir(partial_dir(out)),
            tracker=tracker,
            cache_dir=cfg.paths.cache_dir,
            resume=resuming,
            callbacks=callbacks,
        )
        lora = replace(cfg.lora, **{k: sft_manifest["lora"][k] for k in ("r", "alpha", "dropout", "targets", "qlora")})
        manifest = adapter_manifest(
            result,
            persona_id=persona["id"],
            persona_hash=persona_hash,
            version=version,
            base_cfg=cfg.base_model,
            lora=replace(lora, lr=p.lr),
            seed=cfg.seed,
            dataset_sha256=sft_manifest.get("dataset_sha256"),
            run_hash=run_hash,
            mlflow_run_id=tracker.run_id,
            stages=[
                {
                    "stage": "sft",
                    "version": sft_manifest["version"],
                    "adapter_sha256": sft_sha,
                    "dataset_sha256": sft_manifest.get("dataset_sha256"),
                    "run_hash": sft_manifest.get("run_hash"),
                    "training": sft_manifest.get("training"),
                },
                {
                    "stage": "prefer",
                    "pairs_sha256": pairs_sha,
                    "pairs": len(pairs),
                    "recipe": {k: getattr(p, k) for k in RECIPE},
                    "run_hash": run_hash,
                },
            ],
        )
        tracker.metrics({k: float(v) for k, v in result.metrics.items() if k not in ("val_loss", "train_loss")})
        weights_sha, registry_version = publish_adapter(
            result.peft_model,
            manifest,
            out,
            tracker,
            register=cfg.train.register,
            run_dir=cfg.paths.run_dir,
            registry_tags={"adapter_version": version, "persona_hash": persona_hash, "stage": "prefer"},
        )
        fit = result.metrics
        del result  # the training model's memory, before the scoring model loads
        new_name = module_name(manifest)
        handle = load_with_sft(cfg, sft_dir, sft_manifest, (out, new_name))
        models = {"base": None, "sft": "sft", "prefer": new_name}
        curve = {k: held_out_auc(handle, persona, held, name) for k, name in models.items()}
        tracker.metrics({f"heldout_roc_auc_{k}": v for k, v in curve.items() if v is not None})
    summary = {
        "adapter_dir": str(out),
        "adapter_sha256": weights_sha,
        "adapter_version": version,
        "registry_version": registry_version,
        "objective": manifest["metrics"]["val_loss"],
        "heldout_roc_auc": curve,
        "pairs": {k: report[k] for k in ("pairs", "planned", "dropped", "by_category", "diversity", "held_out")},
        **fit,
    }
    write_json(summary, Path(cfg.paths.run_dir) / "prefer_summary.json")
    events.event("prefer_done", **{k: v for k, v in summary.items() if k != "pairs"})
    auc = ", ".join(f"{k} {v:.3f}" for k, v in curve.items() if v is not None)
    console.print(
        f"[green]prefer:[/] {persona['id']} {version} -> {out}\n"
        f"  {len(pairs)} pairs ({sum(report['dropped'].values())} dropped by the judges), "
        f"val_loss {summary['objective']:.4f}; held-out discrimination ROC-AUC: {auc or 'no held-out prompts'}"
        + (f", registry version {registry_version}" if registry_version else "")
    )
    return {"passed": True, **summary}
