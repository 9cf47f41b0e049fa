"""The training config tree, recipes, and ``dotted.key=value`` overrides.

Setting names are a contract with users' scripts (``train.steps``, ``train.global_batch_size``,
``train.micro_batch_size``, ``train.seq_length``, ``optim.lr``, ``optim.warmup_steps``, ``checkpoint.every``,
``peft.rank``, ``peft.alpha``): rename nothing, add freely.

Batch sizes count *rows* of ``train.seq_length`` tokens. With packing on, a row holds as many whole
conversations as fit; with packing off, one conversation padded to the longest in the micro-batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma3vl.errors import Gemma3VLError

SCHEDULES = ("cosine", "linear", "constant")  # optim.schedule: the learning rate's decay after the warmup
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # parallel.compile_mode: torch.compile modes for blocks


@dataclass
class ModelSettings:
    path: str | None = None  # HF or native directory; None in tiny recipes = a tiny random model
    dtype: str = "auto"  # auto: bf16 compute with fp32 master weights on CUDA, fp32 on CPU
    device: str = "auto"
    attention: str = "auto"  # auto: FlexAttention (block-sparse) on CUDA, SDPA on CPU | sdpa | flex


@dataclass
class DataSettings:
    path: str | None = None  # JSONL of conversations, LLaVA JSON(L), or a local HF dataset; None in tiny recipes
    eval_path: str | None = None
    format: str = "auto"  # auto | messages | llava | texts | hf
    packing: bool = True
    truncation: str = "turns"  # turns | skip
    on_bad_record: str = "skip"  # skip | error
    pan_and_scan: bool = False
    allow_remote_images: bool = False
    allow_outside_paths: bool = False
    max_image_pixels: int = 64_000_000  # width x height above which an image is a bad record (decompression bombs)
    shuffle: bool = True
    eval_accuracy_samples: int = 32  # held-out conversations answered by greedy generation at each eval
    eval_max_new_tokens: int = 32
    # conversation | auto | cord | vqa | caption: read the field's dataset layouts (gemma3vl.evaluation.layouts)
    layout: str = "conversation"
    # metrics of gemma3vl.evaluation.metrics (comma-separated) scored on those answers, logged as eval_<name>
    eval_metric: str = ""
    # Local HF datasets: record key -> column, "messages=chat,images=pictures" (or a YAML mapping), and the split
    # of a save_to_disk DatasetDict or a data directory (eval_split: the held-out set's; "" = split)
    columns: str = ""
    split: str = "train"
    eval_split: str = ""
    # Whole optimizer steps of batches built ahead by one background thread while the current step trains
    # (gemma3vl.data.prefetch); 0: built between steps, on the main thread
    prefetch: int = 2

    def column_map(self) -> dict[str, str] | None:
        given = self.columns or ""
        if isinstance(given, dict):
            return dict(given) or None
        mapping = {}
        for item in filter(None, (part.strip() for part in str(given).split(","))):
            key, equals, column = (text.strip() for text in item.partition("="))
            if not equals or not key or not column:
                raise Gemma3VLError(f"data.columns={given!r}: expected key=column pairs, e.g. messages=chat,images=pictures")
            mapping[key] = column
        return mapping or None

    def eval_metrics(self) -> list[str]:
        given = self.eval_metric or ""
        names = given if isinstance(given, list) else str(given).split(",")  # a YAML list, or "a,b"
        return [str(name).strip() for name in names if str(name).strip()]


@dataclass
class TrainSettings:
    steps: int = 100
    global_batch_size: int = 32
    micro_batch_size: int = 1
    seq_length: int = 4096
    seed: int = 0
    grad_clip: float = 1.0
    # A step whose loss or gradient norm is not finite is skipped (no update); this many in a row stop the run.
    max_nonfinite_steps: int = 3
    freeze_vision: bool = False
    freeze_language: bool = False
    freeze_projector: bool = False
    eval_every: int = 0  # 0: only at the start and the end
    log_every: int = 1


@dataclass
class OptimSettings:
    lr: float = 5e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "cosine"  # after the warmup: cosine | linear (decay to lr * min_lr_ratio) | constant
    min_lr_ratio: float = 0.1  # the decay's floor: lr * min_lr_ratio, reached one step after the last
    fused: str = "auto"  # auto: fused AdamW on CUDA
    # One process: AdamW's moments and an fp32 master copy of the weights live in host memory and the step runs
    # on the CPU (gemma3vl.train.schedule.HostOffloadAdamW); frees 12 bytes per trained parameter on the GPU.
    cpu_offload: bool = False


@dataclass
class CheckpointSettings:
    every: int = 0  # steps between training checkpoints; 0: only at the end
    keep_last: int = 2


@dataclass
class PeftSettings:
    method: str = "none"  # none | lora | dora
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    include_vision: bool = False


@dataclass
class LoggingSettings:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "gemma3vl"
    progress: bool = True


@dataclass
class ParallelSettings:
    """How `torchrun` ranks are arranged (gemma3vl.parallel, docs/distributed.md). One process uses only
    ``activation_checkpoint`` and ``compile``.

    The degrees multiply to the number of processes; one of them may be -1 for "the rest".
    """

    dp_replicate: int = 1  # data-parallel replicas (HSDP: FSDP within a replica, plain replication across)
    dp_shard: int = -1  # FSDP2 degree: parameters, gradients and optimizer states sharded over these ranks
    tp: int = 1  # tensor parallel degree; must divide the KV-head count (4B: 4, 12B: 8, 27B: 16)
    pp: int = 1  # pipeline-parallel ranks: the decoder blocks cut into stages (docs/distributed.md)
    # Pipeline schedule: 1f1b (one stage per rank) | interleaved (Interleaved1F1B, pp_stages_per_rank stages
    # per rank: a smaller bubble for more point-to-point traffic). The pipeline's micro-batches are the step's:
    # global_batch_size / (micro_batch_size x data-parallel ranks), at least pp of them (interleaved: a multiple).
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 2  # virtual stages per pipeline rank, for pp_schedule=interleaved only
    cp: int = 1  # context parallel degree: each sequence sliced over cp ranks, keys/values all-gathered per layer
    sequence_parallel: bool = True  # with tp > 1: norms and the residual stream sharded over the sequence
    activation_checkpoint: str = "none"  # none | full | selective (per op: keep matmul/attention outputs)
    compile: bool = False  # torch.compile each decoder and vision block, and the loss's softmax part
    # with compile: torch.compile's mode for the blocks. max-autotune-no-cudagraphs times inductor's candidate
    # kernels at the model's shapes (matmul tiles, FlexAttention's forward and backward tiles) at the first step
    # and keeps the fastest: minutes more compiling, for a faster step on a long run
    compile_mode: str = "default"
    cpu_offload: bool = False  # FSDP2 keeps sharded parameters, gradients and optimizer states on the CPU


@dataclass
class TrainConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    peft: PeftSettings = field(default_factory=PeftSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    out: str = "out"
    recipe: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        t = self.train
        for name in ("steps", "global_batch_size", "micro_batch_size", "seq_length", "max_nonfinite_steps"):
            if getattr(t, name) < 1:
                raise Gemma3VLError(f"train.{name}={getattr(t, name)} must be >= 1")
        if t.global_batch_size % t.micro_batch_size:
            raise Gemma3VLError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={t.micro_batch_size}"
            )
        choices = {
            "data.truncation": (self.data.truncation, ("turns", "skip")),
            "data.on_bad_record": (self.data.on_bad_record, ("skip", "error")),
            "data.format": (self.data.format, ("auto", "messages", "llava", "texts", "hf")),
            "data.layout": (self.data.layout, ("conversation", "auto", "cord", "vqa", "caption")),
            "peft.method": (self.peft.method, ("none", "lora", "dora")),
            "model.dtype": (self.model.dtype, ("auto", "float32", "bfloat16")),
            "model.attention": (self.model.attention, ("auto", "sdpa", "flex")),
            "parallel.activation_checkpoint": (self.parallel.activation_checkpoint, ("none", "full", "selective")),
            "parallel.pp_schedule": (self.parallel.pp_schedule, ("1f1b", "interleaved")),
            "parallel.compile_mode": (self.parallel.compile_mode, COMPILE_MODES),
            "optim.fused": (self.optim.fused, ("auto", "true", "false")),
            "optim.schedule": (self.optim.schedule, SCHEDULES),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise Gemma3VLError(f"{key}={value!r} is not one of {', '.join(allowed)}")
        self.data.column_map()  # malformed pairs fail here
        if self.data.eval_metrics():
            from gemma3vl.evaluation.metrics import check_metrics

            try:
                check_metrics(self.data.eval_metrics())
            except Gemma3VLError as exc:
                raise Gemma3VLError(f"data.eval_metric: {exc}") from None
        from gemma3vl.train.schedule import check_optim_settings  # (schedule imports this module)

        check_optim_settings(self.optim)  # lr, warmup, betas, eps, weight decay, the floor: before anything loads
        if not 0 < t.grad_clip:  # clip_grad_norm_ to 0 zeroes every gradient: a run that learns nothing
            raise Gemma3VLError(f"train.grad_clip={t.grad_clip} must be > 0 (inf: no clipping)")
        at_least = {"train.log_every": (t.log_every, 1), "train.eval_every": (t.eval_every, 0),
                    "checkpoint.every": (self.checkpoint.every, 0),
                    "data.max_image_pixels": (self.data.max_image_pixels, 1),
                    "data.eval_accuracy_samples": (self.data.eval_accuracy_samples, 0),
                    "data.eval_max_new_tokens": (self.data.eval_max_new_tokens, 1),
                    "data.prefetch": (self.data.prefetch, 0)}
        for key, (value, low) in at_least.items():
            if value < low:
                raise Gemma3VLError(f"{key}={value} must be >= {low}")
        if self.peft.method != "none" and self.peft.rank < 1:
            raise Gemma3VLError(f"peft.rank={self.peft.rank} must be >= 1")
        if self.peft.method != "none":  # checked here, naming the key, rather than after the model has loaded
            if not (math.isfinite(self.peft.alpha) and self.peft.alpha > 0):  # 0 scales the adapters' output
                # to nothing: a run that trains nothing, without a word
                raise Gemma3VLError(f"peft.alpha={self.peft.alpha} must be a finite number > 0")
            if not 0.0 <= self.peft.dropout < 1.0:
                raise Gemma3VLError(f"peft.dropout={self.peft.dropout} must be in [0, 1)")
            from gemma3vl.train.lora import TEXT_PROJECTIONS

            unknown = [name for name in self.peft.targets if name not in TEXT_PROJECTIONS]
            if unknown:
                raise Gemma3VLError(f"peft.targets: unknown projection(s) {', '.join(unknown)}; the text decoder's "
                                    f"are {', '.join(TEXT_PROJECTIONS)}")
            if not self.peft.targets and not self.peft.include_vision:
                raise Gemma3VLError("peft.targets is empty and peft.include_vision=false: nothing to adapt")
            text = bool(self.peft.targets) and not t.freeze_language
            vision = self.peft.include_vision and not t.freeze_vision
            if not text and not vision:  # a frozen part's adapters do not train
                raise Gemma3VLError(
                    "nothing to train: the adapters are on the "
                    + ("text decoder" if self.peft.targets else "vision tower")
                    + (" and the vision tower" if self.peft.targets and self.peft.include_vision else "")
                    + ", which train.freeze_* freezes; unfreeze one, or adapt another part (peft.targets, "
                      "peft.include_vision)")
        if self.parallel.pp_stages_per_rank < 1:
            raise Gemma3VLError(f"parallel.pp_stages_per_rank={self.parallel.pp_stages_per_rank} must be >= 1")
        for name in ("dp_replicate", "dp_shard", "tp", "pp", "cp"):
            value = getattr(self.parallel, name)
            if value == 0 or value < -1:
                raise Gemma3VLError(f"parallel.{name}={value}: a degree is a positive integer, or -1 for the rest")

    def parallel_degrees(self) -> dict[str, int]:
        return {name: getattr(self.parallel, name) for name in ("dp_replicate", "dp_shard", "tp", "pp", "cp")}


def _size_recipe(size: str, mode: str) -> TrainConfig:
    cfg = TrainConfig(recipe=f"gemma3_vl_{size}_{mode}")
    cfg.train = TrainSettings(steps=1000, global_batch_size=32, micro_batch_size=1, seq_length=4096)
    cfg.optim = OptimSettings(lr=5e-5 if mode == "sft" else 2e-4, warmup_steps=10)
    cfg.checkpoint = CheckpointSettings(every=200, keep_last=2)
    if mode == "peft":
        cfg.peft = PeftSettings(method="lora", rank=16, alpha=32.0)
    return cfg


def _tiny_recipe(mode: str) -> TrainConfig:
    cfg = TrainConfig(recipe=f"tiny_{mode}")
    cfg.train = TrainSettings(steps=40, global_batch_size=8, micro_batch_size=4, seq_length=256, eval_every=20)
    cfg.optim = OptimSettings(lr=3e-3 if mode == "sft" else 1e-2, warmup_steps=5, weight_decay=0.0)
    cfg.checkpoint = CheckpointSettings(every=20, keep_last=2)
    cfg.data.eval_accuracy_samples = 24
    cfg.data.eval_max_new_tokens = 8
    if mode == "peft":
        cfg.peft = PeftSettings(method="lora", rank=8, alpha=16.0)
    return cfg


RECIPES: dict[str, Any] = {
    **{f"gemma3_vl_{size}_{mode}": (lambda s=size, m=mode: _size_recipe(s, m))
       for size in ("4b", "12b", "27b") for mode in ("sft", "peft")},
    "tiny_sft": lambda: _tiny_recipe("sft"),
    "tiny_peft": lambda: _tiny_recipe("peft"),
}

RECIPE_NOTES = {
    "gemma3_vl_4b_sft": "full SFT of the 4B",
    "gemma3_vl_4b_peft": "LoRA r16 on the 4B text attention and MLP projections",
    "gemma3_vl_12b_sft": "full SFT of the 12B",
    "gemma3_vl_12b_peft": "LoRA r16 on the 12B text attention and MLP projections",
    "gemma3_vl_27b_sft": "full SFT of the 27B",
    "gemma3_vl_27b_peft": "LoRA r16 on the 27B text attention and MLP projections",
    "tiny_sft": "full SFT of a tiny random model on drawn shapes; about a minute on a CPU",
    "tiny_peft": "LoRA on a tiny random model on drawn shapes; about a minute on a CPU",
}


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise Gemma3VLError(f"unknown recipe {name!r}; `gemma3vl recipes` lists them: {', '.join(RECIPES)}")
    return RECIPES[name]()


def _convert(text: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise Gemma3VLError(f"{key}={text!r}: expected true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise Gemma3VLError(f"{key}={text!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise Gemma3VLError(f"{key}={text!r}: expected a number") from None
    if isinstance(current, list):
        inner = text.strip()
        if inner.startswith("[") and inner.endswith("]"):  # YAML's flow form: [q_proj, v_proj], [] (empty)
            inner = inner[1:-1]
        return [part.strip().strip("'\"") for part in inner.split(",") if part.strip().strip("'\"")]
    if text.lower() in ("none", "null"):
        return None
    return text


def _default(field_: dataclasses.Field) -> Any:
    if field_.default_factory is not dataclasses.MISSING:
        return field_.default_factory()
    return field_.default


def _check_type(value: Any, default: Any, key: str) -> Any:
    """A typed value (from YAML / JSON) checked against the setting's kind, so ``steps: [1]`` or ``lr: null``
    fails here, naming the key, rather than deep in training (or not at all)."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok, kind = isinstance(value, list) and all(isinstance(item, str) for item in value), "a list of strings"
    elif key == "data.columns":  # "messages=chat,images=pictures", or a YAML mapping
        ok = isinstance(value, str) or (isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()))
        kind = "key=column pairs or a mapping of record keys to column names"
    elif key == "data.eval_metric":  # a comma list, or a YAML list of names
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))
        kind = "a string or a list of strings"
    elif default is None:  # paths not set by default
        ok, kind = value is None or isinstance(value, str), "a string"
    else:
        if isinstance(value, bool) and key == "optim.fused":  # auto | true | false, and YAML's true / false
            value = str(value).lower()
        ok, kind = isinstance(value, str), "a string"
    if not ok:
        raise Gemma3VLError(f"{key}={value!r}: expected {kind}")
    return value


def _suggest(cfg: TrainConfig, name: str) -> str:
    """`` (did you mean optim.lr?)`` when another section has a setting of that name."""
    found = [f"{section.name}.{name}" for section in dataclasses.fields(cfg)
             if dataclasses.is_dataclass(getattr(cfg, section.name))
             and name in {f.name for f in dataclasses.fields(getattr(cfg, section.name))}]
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def set_value(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set ``section.name`` (or top-level ``out``) from a string or an already typed value."""
    parts = key.split(".")
    if key == "recipe":
        raise Gemma3VLError("the recipe is chosen with --recipe NAME (or 'recipe:' in the --config file)")
    target: Any = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or not hasattr(target, part):
            raise Gemma3VLError(f"unknown setting {key!r}")
        target = getattr(target, part)
    name = parts[-1]
    fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
    if name not in fields:
        raise Gemma3VLError(f"unknown setting {key!r}" + (_suggest(cfg, name) if len(parts) == 2 else ""))
    current = getattr(target, name)
    if dataclasses.is_dataclass(current):
        raise Gemma3VLError(f"{key!r} is a section; set one of its fields, e.g. {key}.{dataclasses.fields(current)[0].name}")
    # The setting's kind is that of its default (a path set earlier to a string is still a path).
    default = _default(fields[name])
    if isinstance(value, str) and not (key == "data.eval_metric" or isinstance(default, str)):
        value = _convert(value, default, key)
    value = _check_type(value, default, key)
    setattr(target, name, value)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    for item in overrides:
        if "=" not in item:
            raise Gemma3VLError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value.strip())
    return cfg


def apply_mapping(cfg: TrainConfig, mapping: dict[str, Any], prefix: str = "", where: str = "config") -> TrainConfig:
    """Nested dict (from YAML/JSON) onto the config; unknown keys are errors."""
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted != "data.columns":  # the one setting that is itself a mapping
            apply_mapping(cfg, value, prefix=dotted + ".", where=where)
        else:
            try:
                set_value(cfg, dotted, value)
            except Gemma3VLError as exc:
                raise Gemma3VLError(f"{where}: {exc}") from None
    return cfg


def _yaml_loader() -> Any:
    """yaml's SafeLoader, except that a key given twice in one mapping is an error naming it and its line
    (yaml keeps the last one silently: ``steps: 100`` then ``steps: 10`` would train 10 steps unnoticed)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # (<<: *anchor: its keys may be overridden here)
                continue
            key = loader.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice ("
                        + (f"lines {seen[key]} and {line}" if seen[key] != line else f"line {line}") + ")",
                        key_node.start_mark)
                seen[key] = line
            except TypeError:  # an unhashable key: yaml's own constructor says so
                break
        loader.flatten_mapping(node)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: a key given twice in one object is an error (json keeps the last silently)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} is given twice in one object")
        seen[key] = value
    return seen


def _parse_error(exc: Exception) -> str:
    """A YAML or JSON parse error on one line, with its line and column (yaml's own text spans several lines,
    quoting the source with a caret under it)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        context = getattr(exc, "context", None)
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")
    return " ".join(str(exc).split())


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise Gemma3VLError(f"{path}: a directory, not a config file (--config names a YAML or JSON file)")
    if not path.is_file():
        raise Gemma3VLError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Gemma3VLError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                            "a config file is YAML or JSON text") from None
    except OSError as exc:
        raise Gemma3VLError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_yaml_loader()) or {}
        else:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except Exception as exc:
        raise Gemma3VLError(f"{path}: cannot parse ({_parse_error(exc)})") from None
    if not isinstance(data, dict):
        raise Gemma3VLError(f"{path}: expected a mapping at the top level")
    return data


def build_config(
    recipe_name: str | None, config_file: str | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """recipe defaults <- config file <- command-line overrides."""
    data = load_config_file(config_file) if config_file else {}
    if not recipe_name and "recipe" in data and not isinstance(data["recipe"], str):
        raise Gemma3VLError(f"{config_file}: recipe={data['recipe']!r}: expected a recipe name (a string; "
                            "`gemma3vl recipes` lists them)")
    name = recipe_name or data.pop("recipe", None)
    cfg = recipe(name) if name else TrainConfig()
    data.pop("recipe", None)
    apply_mapping(cfg, data, where=str(config_file))
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg
