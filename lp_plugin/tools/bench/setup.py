"""What lp-bench sets up before measuring: the device, the plain model (a shape with seeded random
weights, or a checkpoint), the checkpoint that ``load=pretrained`` configs load from, the tokenizer,
the fixed inputs, and a description of the machine.

torch is imported inside the functions so that ``lp-bench --help`` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass

from lp_plugin.core.report import GIB

from .measure import allocated


class SetupError(ValueError):
    """Settings lp-bench cannot run with (a bad device, a missing model): a usage error."""


@dataclass
class BenchSettings:
    model: str
    dtype: str = "bf16"
    device: str | None = None
    prompt: int = 100
    new: int = 64
    prefill: int = 512
    ppl_tokens: int = 512
    repeats: int = 3
    seed: int = 0
    tokenizer: str = "auto"  # auto | none | PATH
    offload_dir: str | None = None
    bandwidth_bytes: int = GIB
    bandwidth_iters: int = 3
    static: str = "auto"  # auto (on with CUDA) | on | off
    threads: int | None = None
    progress: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("progress")
        return d


def resolve_device(name):
    """``--device`` as a ``torch.device`` (the one CUDA index rule of :func:`lp_plugin.planning.plan.normalize_device`);
    :class:`SetupError` for a name torch cannot read or a CUDA device this machine does not have."""
    import torch

    from lp_plugin.planning.plan import normalize_device

    if name in (None, "auto"):
        name = None
    else:
        try:
            kind = torch.device(name).type
        except (RuntimeError, ValueError):
            raise SetupError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise SetupError(f"--device {name} asked for, but torch sees no CUDA device here; use --device cpu")
        if kind not in ("cpu", "cuda"):
            raise SetupError(f"--device {name!r}: lp-bench measures on cpu or cuda")
    device = normalize_device(name)
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise SetupError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    return device


def static_enabled(choice: str, device) -> bool:
    """``--static auto`` measures the static cache where transformers compiles it (CUDA) only."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


# ----------------------------------------------------------------------------- the plain model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder) -> bool:
    """Whether a checkpoint folder holds a tokenizer (any of its usual files)."""
    return folder is not None and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


class BaseModel:
    """The plain model every config is measured against, and the checkpoint folder that
    ``load=pretrained`` configs load from (a shape is saved once to a temporary folder, removed by
    :meth:`close`)."""

    def __init__(self, settings: BenchSettings, device, need_checkpoint: bool):
        from lp_plugin.tools import shapes

        self.device = device
        self.kind = "shape" if shapes.is_shape(settings.model) else "pretrained"
        self.checkpoint: str | None = None if self.kind == "shape" else settings.model
        self._own_folder: str | None = None
        why = shapes.model_name_problem(settings.model)
        if why is not None:
            raise SetupError(f"--model {why}")
        before = allocated(device)
        try:
            self.model = self._load(settings, shapes, need_checkpoint)
        except BaseException:  # also SIGTERM or Ctrl-C while a shape is saved: no temporary checkpoint is left
            self.close()
            raise
        after = allocated(device)
        # what the plain model holds on the device: a config that loads its own model sits beside it
        self.device_bytes = after - before if after is not None else None

    def _load(self, settings, shapes, need_checkpoint):
        name, dtype = settings.model, settings.dtype
        if self.kind == "pretrained":
            try:
                return shapes.load_checkpoint(name, dtype, self.device)
            except OSError as exc:
                raise SetupError(f"--model {name!r} cannot be loaded: {exc}") from None
        if not need_checkpoint:
            if dtype == "nf4":
                return shapes.build_shape_model_nf4(name, self.device, settings.seed)
            return shapes.build_shape_model(name, dtype, self.device, settings.seed)
        self._own_folder = tempfile.mkdtemp(prefix=f"lp-bench-{name}-", dir=shapes.scratch_dir())
        self.checkpoint = self._own_folder
        model = shapes.save_shape_checkpoint(
            name, self._own_folder, "bf16" if dtype == "nf4" else dtype, self.device, settings.seed
        )
        if dtype != "nf4":
            return model
        del model  # the checkpoint holds bf16 weights: the plain NF4 model is loaded from it
        return shapes.load_checkpoint(self._own_folder, "nf4", self.device)

    def add_tokenizer(self, tok) -> None:
        """Save the run's tokenizer with a checkpoint lp-bench wrote itself (a shape's), as a real
        checkpoint has one (AirLLM loads it); a user's checkpoint folder is never written to."""
        if self._own_folder and not has_tokenizer(self._own_folder):
            tok.save_pretrained(self._own_folder)

    def load_kwargs(self, dtype: str) -> dict:
        """What ``lp_plugin.from_pretrained`` needs besides the offload options to load the checkpoint
        the way the plain model was loaded."""
        import torch

        from lp_plugin.integrations.quant import nf4_config
        from lp_plugin.tools.shapes import torch_dtype

        if dtype == "nf4":
            return {"dtype": torch.bfloat16, "quantization_config": nf4_config(torch.bfloat16)}
        return {"dtype": torch_dtype(dtype)}

    def close(self) -> None:
        if self._own_folder:
            shutil.rmtree(self._own_folder, ignore_errors=True)
            self._own_folder = None


def decoder_layers(model):
    from lp_plugin.planning.arch import find_decoder_layers

    return find_decoder_layers(model)[1]


def layer_bytes(layer) -> int:
    """The bytes of one decoder layer as lp_plugin packs it (4-bit quant states included)."""
    from lp_plugin.core.flat import LayerLayout

    return LayerLayout(layer).nbytes


# ----------------------------------------------------------------------------- tokenizer and inputs
def fixed_text(max_chars: int = 200_000) -> str:
    """A fixed English text shipped with CPython (the pydoc topics), for perplexity and prompts."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]


def make_tokenizer(choice: str, model_name: str, is_shape: bool):
    """Return ``(tokenizer or None, info dict)``: ``auto`` is the model's own (a shape's: the bundled
    model's), ``none`` the UTF-8 bytes of the text, anything else a tokenizer folder."""
    info = {"choice": choice, "source": None, "note": None}
    if choice == "none":
        info["note"] = "no tokenizer (--tokenizer none): token ids are the UTF-8 bytes of the fixed text"
        return None, info
    from transformers import AutoTokenizer

    if choice != "auto":
        source = choice
    elif is_shape:
        from lp_plugin.tools.bundled import bundled_tokenizer_path

        try:
            source = bundled_tokenizer_path()
        except Exception as exc:  # noqa: BLE001 - the bundled model is optional here: fall back to bytes
            info["note"] = (
                f"bundled tokenizer unavailable ({type(exc).__name__}): token ids are the UTF-8 bytes of the text"
            )
            return None, info
    else:
        source = model_name
    try:
        tok = AutoTokenizer.from_pretrained(source)
        if not tok("The text.", add_special_tokens=False)["input_ids"]:  # a folder without tokenizer files loads empty
            raise ValueError("it has no vocabulary (it gives no tokens for text)")
    except Exception as exc:  # noqa: BLE001 - any failure means: no tokenizer
        if choice != "auto":
            raise SetupError(f"--tokenizer {choice!r} cannot be loaded ({type(exc).__name__}: {exc})") from None
        info["note"] = (
            f"tokenizer of {source!r} not usable ({type(exc).__name__}: {exc}): token ids are the UTF-8 bytes of "
            "the text"
        )
        return None, info
    info["source"] = source
    return tok, info


def make_inputs(tokenizer, vocab_size: int, prompt: int, prefill: int, ppl_tokens: int) -> dict:
    """Token id lists (plain Python ints) for the prompt, the prefill and the perplexity text."""
    text = fixed_text()
    ids: list[int] = (
        list(text.encode("utf-8")) if tokenizer is None else tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    note = None
    if max(ids) >= vocab_size:
        ids = [i % vocab_size for i in ids]
        note = f"token ids folded modulo the model's vocab_size {vocab_size}"
    need = max(prompt, prefill) + ppl_tokens
    if len(ids) < need:
        raise SetupError(
            f"the fixed text gives {len(ids)} tokens, fewer than the {need} asked for; lower --prefill/--ppl-tokens"
        )
    half = len(ids) // 2
    parts = {"prompt": ids[:prompt], "prefill": ids[:prefill], "ppl": ids[half : half + ppl_tokens]}
    out: dict[str, list[int] | str | None] = {**parts, "note": note}
    for key in ("ppl", "prompt"):
        out[f"{key}_ids_sha256"] = hashlib.sha256(",".join(map(str, parts[key])).encode()).hexdigest()
    return out


# ----------------------------------------------------------------------------- the machine
def _version(name: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(device) -> dict:
    import torch

    import lp_plugin

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "bitsandbytes": _version("bitsandbytes"),
        "lp_plugin": lp_plugin.__version__,
        "device": str(device),
        "gpu_name": None,
        "gpu_total_memory_bytes": None,
        "gpu_capability": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu_name=props.name,
            gpu_total_memory_bytes=int(props.total_memory),
            gpu_capability=f"{props.major}.{props.minor}",
        )
    return env
