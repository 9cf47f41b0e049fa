"""Opening checkpoint directories (HF or native) and checking every tensor before anything is converted.

Both kinds present the same face to the converters: ``config``, ``mappings`` (the table made concrete for
this checkpoint) and ``read_native(mapping)``, one tensor at a time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from gemma3vl.bridge.fsutil import write_text_durable
from gemma3vl.bridge.layouts import LAYOUTS, Layout, detect_layout
from gemma3vl.bridge.mapping import Mapping, build_mappings
from gemma3vl.bridge.safetensors_io import DTYPES, PlannedTensor, SafetensorsFile, TensorInfo
from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError

logger = logging.getLogger("gemma3vl.bridge")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST = "gemma3vl.json"
FORMAT = "gemma3vl-native"
FORMAT_VERSION = 1
MAX_PROBLEMS_SHOWN = 20
NATIVE_LM_HEAD = "text.lm_head.weight"
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter directory (not a model)
# Weights are floating point; an integer or boolean tensor under a weight's name is a quantizer's or a
# corrupt file's, and casting it into the model would give garbage without a word.
WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class WeightFiles:
    """The safetensors files of a directory: ``model.safetensors``, else the shards its index names (the
    order transformers looks in). Every header is checked when opened; handles stay open for reading."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: dict[str, SafetensorsFile] = {}
        self.weight_map: dict[str, str] | None = None  # from the index, when sharded
        self.index_metadata: dict[str, Any] | None = None
        self.index_text: str | None = None  # the index file as it is (export gives it back verbatim)
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        self.where: dict[str, str] = {}  # key -> file name
        for name, handle in self.files.items():
            for key in handle.tensors:
                if key in self.where:
                    raise Gemma3VLError(
                        f"{directory}: tensor {key!r} is stored twice, in {self.where[key]} and in {name}"
                    )
                self.where[key] = name

    def _open(self) -> None:
        single, index = self.directory / SINGLE_FILE, self.directory / INDEX_FILE
        if single.is_file():
            self.files[SINGLE_FILE] = SafetensorsFile(single)
            return
        if not index.is_file():
            raise Gemma3VLError(
                f"{self.directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found{self._no_weights_hint()}")
        try:
            text = index.read_bytes().decode("utf-8")  # bytes: read_text would turn "\r\n" into "\n"
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Gemma3VLError(f"{index}: not valid JSON ({exc})") from None
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise Gemma3VLError(f"{index}: no 'weight_map' object mapping tensor names to file names")
        self.weight_map = weight_map
        self.index_metadata = raw.get("metadata")
        self.index_text = text
        for name in sorted(set(weight_map.values())):
            path = self.directory / name
            if Path(name).name != name:
                raise Gemma3VLError(f"{index}: shard name {name!r} is not a plain file name")
            if not path.is_file():
                keys = sorted(k for k, v in weight_map.items() if v == name)
                raise Gemma3VLError(
                    f"{path}: shard named in {index} is missing (it should hold {len(keys)} tensors, e.g. {keys[0]!r})"
                )
            self.files[name] = SafetensorsFile(path)

    def _no_weights_hint(self) -> str:
        """Why a directory without model.safetensors or an index may still look like a checkpoint."""
        if (self.directory / ADAPTER_CONFIG).is_file():
            return (f" ({ADAPTER_CONFIG} is here: this is a PEFT adapter, not a model; use its base model "
                    "(gemma3vl eval takes the adapter with --adapter) or merge the adapter into it first)")
        others = sorted(p.name for p in self.directory.glob("*.bin"))
        if others:
            return f" (found {', '.join(others)}: only safetensors checkpoints are supported)"
        others = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if others:
            return (f" (found {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} but no {INDEX_FILE} "
                    "saying which tensors each holds; transformers needs it too)")
        return ""

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()

    def keys(self) -> set[str]:
        return set(self.where)

    def info(self, key: str) -> TensorInfo:
        return self.files[self.where[key]].tensors[key]

    def path_of(self, key: str) -> Path:
        return self.files[self.where[key]].path

    def read(self, key: str) -> torch.Tensor:
        return self.files[self.where[key]].read(key)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        self.files[self.where[key]].read_into(key, out)

    def read_region(self, key: str, region: Sequence[slice], view_shape: Sequence[int] | None = None) -> torch.Tensor:
        return self.files[self.where[key]].read_region(key, region, view_shape)

    @property
    def bytes_read(self) -> int:
        return sum(handle.bytes_read for handle in self.files.values())

    def expected_path(self, key: str) -> Path:
        """Where a missing ``key`` should have been: its index entry, else the index, else the single file."""
        if self.weight_map is None:
            return self.directory / SINGLE_FILE
        listed = self.weight_map.get(key)
        return self.directory / listed if listed else self.directory / INDEX_FILE

    def check(self, expected: dict[str, tuple[tuple[int, ...], bool]]) -> None:
        """Every required key present, no other key, every shape right, and the index agreeing with the
        files. ``expected`` maps key -> (shape, optional). All problems are reported together."""
        problems = []
        for key, (shape, optional) in expected.items():
            if key not in self.where:
                if not optional:
                    problems.append(f"missing tensor {key!r} (expected in {self.expected_path(key)})")
                continue
            actual = self.info(key).shape
            if actual != tuple(shape):
                problems.append(
                    f"{self.path_of(key)}: tensor {key!r} has shape {list(actual)}, expected {list(shape)}"
                )
            dtype = self.info(key).dtype
            if dtype not in WEIGHT_DTYPES:
                problems.append(
                    f"{self.path_of(key)}: tensor {key!r} has dtype {dtype}, expected a floating-point dtype "
                    f"({', '.join(WEIGHT_DTYPES)}); quantized or corrupt?"
                )
        for key in sorted(self.keys() - set(expected)):
            problems.append(f"{self.path_of(key)}: unexpected tensor {key!r}")
        if self.weight_map is not None:
            index = self.directory / INDEX_FILE
            for key in sorted(self.keys()):
                listed = self.weight_map.get(key)
                if listed is None:
                    problems.append(f"{self.path_of(key)}: tensor {key!r} is not listed in {index}")
                elif listed != self.where[key]:
                    problems.append(f"{index}: lists tensor {key!r} in {listed}, but it is in {self.where[key]}")
            for key in sorted(set(self.weight_map) - self.keys()):
                if key in expected and not expected[key][1]:
                    continue  # already reported as missing, with the file the index names
                # A tensor the model does not need (a tied lm_head some tools list anyway): transformers ignores
                # the entry, and so does the import; the export's index lists what the files hold
                logger.warning("%s: lists tensor %r in %s, but no file holds it: left out, as transformers leaves "
                               "it out", index, key, self.weight_map[key])
        if problems:
            shown = problems[:MAX_PROBLEMS_SHOWN]
            more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
            raise Gemma3VLError(
                f"{self.directory}: {len(problems)} problem(s) with the weights:\n  " + "\n  ".join(shown) + more
            )


class _Checkpoint:
    """Shared by both kinds: the files, the config, the layout, the mappings, and reading native tensors."""

    directory: Path
    config: Gemma3Config
    files: WeightFiles
    layout: Layout
    mappings: list[Mapping]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.files.close()

    def close(self) -> None:
        self.files.close()

    def _map_and_check(self, lm_head_key: str, keys_of) -> None:
        """The mappings of this checkpoint (its lm_head too if it stores one; required if the config unties
        it) and the check of every stored tensor against them."""
        has_head = lm_head_key in self.files.keys()
        self.mappings = build_mappings(self.config, self.layout, lm_head=True if has_head else None)
        self.files.check({key: (shape, m.optional) for m in self.mappings for key, shape in keys_of(m)})

    def planned_native(self) -> list[PlannedTensor]:
        """The native tensors this checkpoint yields, with dtype and shape, before reading any data."""
        return [PlannedTensor(m.native, self.native_dtype(m), m.native_shape) for m in self.mappings]


class HFCheckpoint(_Checkpoint):
    """An HF Gemma 3 directory: config.json plus safetensors in one of the layouts of layouts.py."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if (self.directory / MANIFEST).is_file():
            raise Gemma3VLError(f"{self.directory}: this is a native gemma3vl checkpoint, not an HF one")
        self.config_path = self.directory / "config.json"
        self.config = Gemma3Config.from_file(self.config_path)
        # Bytes, decoded: read_text would turn "\r\n" into "\n", and export gives this text back verbatim.
        self.config_text = self.config_path.read_bytes().decode("utf-8")
        self.files = WeightFiles(self.directory)
        try:
            self.layout = detect_layout(self.files.keys(), self.config.is_vision_language, str(self.directory))
            self._map_and_check(self.layout.lm_head, lambda m: zip(m.hf, m.hf_shapes))
            self._check_part_dtypes()
        except BaseException:
            self.files.close()
            raise

    def _check_part_dtypes(self) -> None:
        for m in self.mappings:
            dtypes = {self.files.info(k).dtype for k in m.hf}
            if len(dtypes) > 1:
                found = ", ".join(f"{k} ({self.files.info(k).dtype} in {self.files.path_of(k)})" for k in m.hf)
                raise Gemma3VLError(
                    f"{self.directory}: {m.native} is fused from tensors of different dtypes: {found}; "
                    "they must share one dtype to be fused losslessly"
                )

    def native_dtype(self, m: Mapping) -> str:
        return self.files.info(m.hf[0]).dtype

    def read_native(self, m: Mapping) -> torch.Tensor:
        """The native tensor, its HF parts read from disk straight into their places (no concatenation)."""
        out = torch.empty(m.native_shape, dtype=DTYPES[self.native_dtype(m)])
        for key, slot in zip(m.hf, m.op.slots(out)):
            self.files.read_into(key, slot)
        return out

    def read_native_region(self, m: Mapping, region: Sequence[slice]) -> torch.Tensor:
        """Only ``region`` of the native tensor (one rank's shard), reading only those bytes of the HF parts."""
        out = torch.empty([r.stop - r.start for r in region], dtype=DTYPES[self.native_dtype(m)])
        for read in m.op.region_reads(tuple(region), m.hf_shapes):
            out[read.out_region] = self.files.read_region(m.hf[read.part], read.part_region, read.view_shape)
        return out


def write_index(directory: Path, shards: dict[str, Sequence[PlannedTensor]], metadata: dict[str, Any] | None,
                source_text: str | None = None) -> None:
    """transformers' ``model.safetensors.index.json`` (same JSON style as save_pretrained), or ``source_text``
    as it is when that says the same (a source index written by another tool: other indentation, key order)."""
    weight_map = {t.name: name for name, shard in shards.items() for t in shard}
    index = {"metadata": metadata or {}, "weight_map": weight_map}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    if source_text is not None:
        try:
            source = json.loads(source_text)
        except json.JSONDecodeError:
            source = None
        if (isinstance(source, dict) and source.get("weight_map") == weight_map
                and (source.get("metadata") or {}) == index["metadata"]):
            text = source_text
    write_text_durable(directory / INDEX_FILE, text)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Gemma3VLError(f"{directory}: not a native gemma3vl checkpoint (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Gemma3VLError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Gemma3VLError(f"{path}: 'format' is not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise Gemma3VLError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported (this gemma3vl reads "
            f"{FORMAT_VERSION})"
        )
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """The manifest's keys as ``convert`` wrote them, each checked: one error naming the key at fault (a damaged
    file was a KeyError or TypeError traceback from deep inside the export)."""
    def bad(key: str, what: str) -> Gemma3VLError:
        return Gemma3VLError(f"{path}: {key!r} {what} (the file is damaged: import the checkpoint again)")

    config = manifest.get("config_json")
    try:
        parsed = json.loads(config) if isinstance(config, str) else None
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise bad("config_json", "must hold the source's config.json text, a JSON object")
    source = manifest.get("source")
    if not isinstance(source, dict):
        raise bad("source", "must be an object")
    if not isinstance(source.get("layout"), str) or source["layout"] not in LAYOUTS:
        raise bad("source.layout", f"is {source.get('layout')!r}, not one of {', '.join(LAYOUTS)}")
    if not isinstance(source.get("sharded"), bool):
        raise bad("source.sharded", "must be true or false")
    files = source.get("files")
    if not isinstance(files, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("tensors"), list)
            and all(isinstance(key, str) for key in entry["tensors"])
            and isinstance(entry.get("metadata", {}), (dict, type(None))) for entry in files):
        raise bad("source.files", "must be a list of {\"name\", \"tensors\", \"metadata\"} objects")
    for key, kinds in (("index_metadata", (dict, type(None))), ("index_json", (str, type(None))),
                       ("dtypes", (dict, type(None)))):
        if not isinstance(source.get(key), kinds):
            raise bad(f"source.{key}", f"must be {' or '.join(k.__name__ for k in kinds).replace('NoneType', 'null')}")
    side = manifest.get("side_files", [])
    if not isinstance(side, list) or not all(isinstance(name, str) for name in side):
        raise bad("side_files", "must be a list of file names")


class NativeCheckpoint(_Checkpoint):
    """A directory written by import_checkpoint: native safetensors shards and the gemma3vl.json manifest."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.config = Gemma3Config.from_hf_dict(
            json.loads(self.manifest["config_json"]), where=f"{self.directory / MANIFEST}: config_json"
        )
        # Native names do not depend on the layout; any layout of the right kind gives the same mappings.
        self.layout = LAYOUTS["hub" if self.config.is_vision_language else "text"]
        self.files = WeightFiles(self.directory)
        try:
            self._map_and_check(NATIVE_LM_HEAD, lambda m: [(m.native, m.native_shape)])
        except BaseException:
            self.files.close()
            raise

    def native_dtype(self, m: Mapping) -> str:
        return self.files.info(m.native).dtype

    def read_native(self, m: Mapping) -> torch.Tensor:
        return self.files.read(m.native)

    def read_native_region(self, m: Mapping, region: Sequence[slice]) -> torch.Tensor:
        return self.files.read_region(m.native, region)


def open_checkpoint(directory: str | Path) -> HFCheckpoint | NativeCheckpoint:
    directory = Path(directory)
    if not directory.is_dir():
        raise Gemma3VLError(f"{directory}: no such directory")
    return NativeCheckpoint(directory) if (directory / MANIFEST).is_file() else HFCheckpoint(directory)
