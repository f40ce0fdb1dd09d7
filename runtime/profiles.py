"""Shape ranges for TensorRT: from a user's batch and image-size ranges to each input's min/opt/max.

Pure Python, shared by the engine builder (export side) and the TensorRT backend (runtime side),
so that the shapes an engine was built for and the shapes a request is checked against come from
one translation. Every input's shape is derived from the component's symbolic dimensions in the
manifest (``batch``, ``latent_height``, ``image_width``, ...), never written per call site:

    batch                        images per call; the UNet's batch is doubled for classifier-free guidance
    latent_height, latent_width  pixels / vae_scale_factor
    image_height, image_width    pixels
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sdrt.runtime.errors import InputError
from sdrt.runtime.families import control_specs, reduced
from sdrt.runtime.manifest import Component, Manifest


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (0 < self.min <= self.opt <= self.max):
            raise InputError(f"range: expected 0 < min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}")

    @classmethod
    def parse(cls, text: str, what: str) -> Range:
        """``"512"`` (static), ``"256:512:768"`` (min:opt:max) or ``"1:4"`` (min:max, opt = max)."""
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            parts = []
        if len(parts) == 1:
            parts = parts * 3
        elif len(parts) == 2:
            parts = [parts[0], parts[1], parts[1]]
        if len(parts) != 3:
            raise InputError(f"{what}: expected N, MIN:MAX or MIN:OPT:MAX (integers), got {text!r}")
        return cls(*parts)

    def __str__(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}..{self.max} (opt {self.opt})"


@dataclass(frozen=True)
class ShapeRanges:
    """What the user asks engines to serve: images per prompt batch, and image height/width in pixels."""

    batch: Range = Range(1, 1, 4)
    height: Range = Range(256, 512, 1024)
    width: Range = Range(256, 512, 1024)

    def check(self, manifest: Manifest) -> None:
        m = manifest.spatial_multiple
        for name, r in (("height", self.height), ("width", self.width)):
            bad = [v for v in (r.min, r.opt, r.max) if v % m]
            if bad:
                raise InputError(
                    f"{name} range: expected multiples of {m} pixels for this model (the latent must halve "
                    f"cleanly at every UNet level), got {r.min}:{r.opt}:{r.max}"
                )

    @property
    def is_static(self) -> bool:
        return all(r.min == r.max for r in (self.batch, self.height, self.width))

    def to_dict(self) -> dict:
        return {k: asdict(v) for k, v in (("batch", self.batch), ("height", self.height), ("width", self.width))}

    @classmethod
    def from_dict(cls, d: dict) -> ShapeRanges:
        return cls(**{k: Range(**d[k]) for k in ("batch", "height", "width")})


def dimension_ranges(component: str, manifest: Manifest, ranges: ShapeRanges) -> dict[str, Range]:
    """The range of every symbolic dimension a component's tensors use."""
    f = manifest.vae_scale_factor
    batch = ranges.batch
    specs = manifest.model_family.specs(manifest.model_dims)
    spec = specs[component] if component in specs else control_specs(manifest.model_dims)[component]
    if spec.batch != "images":
        # Guided calls double the UNet's batch (unconditional rows + conditional rows), and the text
        # encoders see prompts and negative prompts in one call; min stays the single batch so that
        # guidance_scale <= 1 (no doubling) is still served.
        batch = Range(batch.min, 2 * batch.opt, 2 * batch.max)
    out = {
        "batch": batch,
        "image_height": ranges.height,
        "image_width": ranges.width,
    }
    for level in range(manifest.model_dims.unet_levels):  # latent sizes, and the UNet's inner ones (ControlNet)
        for name, pixels in (("latent_height", ranges.height), ("latent_width", ranges.width)):
            d = f * 2**level
            out[reduced(name, level)] = Range(pixels.min // d, pixels.opt // d, pixels.max // d)
    dims = manifest.model_dims
    if dims.t5_hidden:  # SD 3: T5's tokens per call (max_sequence_length), up to T5's 512; the joint text tokens
        t5 = Range(1, dims.t5_default_length, max(T5_MAX_TOKENS, dims.t5_default_length))
        out["t5_tokens"] = t5
        out["text_tokens"] = Range(dims.text_length + t5.min, dims.text_length + t5.opt, dims.text_length + t5.max)
    return out


T5_MAX_TOKENS = 512  # SD 3's T5 tokenizer's model_max_length: diffusers' limit on max_sequence_length


Shape = tuple[int, ...]


def _shapes(component: Component, specs, dims: dict[str, Range], which: str) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for spec in specs:
        if spec.name in component.scalar_inputs:
            shapes[spec.name] = ()
            continue
        shape = []
        for d in spec.shape:
            if isinstance(d, int):
                shape.append(d)
            elif d in dims:
                shape.append(getattr(dims[d], which))
            else:
                raise InputError(f"{component.name} tensor {spec.name!r}: no range for symbolic dimension {d!r}")
        shapes[spec.name] = tuple(shape)
    return shapes


def input_profile(
    component: Component, manifest: Manifest, ranges: ShapeRanges
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``{input name: (min shape, opt shape, max shape)}`` for one optimization profile."""
    ranges.check(manifest)
    dims = dimension_ranges(component.name, manifest, ranges)
    lo, opt, hi = (_shapes(component, component.inputs, dims, w) for w in ("min", "opt", "max"))
    return {name: (lo[name], opt[name], hi[name]) for name in lo}


def output_max_shapes(component: Component, manifest: Manifest, ranges: ShapeRanges) -> dict[str, Shape]:
    """Each output's largest shape within the ranges (device buffers are allocated at this size)."""
    return _shapes(component, component.outputs, dimension_ranges(component.name, manifest, ranges), "max")


def check_shapes(component: str, profile: dict[str, tuple[Shape, Shape, Shape]], shapes: dict[str, Shape]) -> None:
    """Refuse input shapes outside an engine's profile, naming the allowed range per dimension."""
    for name, shape in shapes.items():
        if name not in profile:
            raise InputError(f"{component}: input {name!r} is not in the engine's profile ({sorted(profile)})")
        lo, _, hi = profile[name]
        if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
            raise InputError(
                f"{component} input {name!r}: shape {tuple(shape)} is outside the engine's profile "
                f"{tuple(lo)} .. {tuple(hi)}; rebuild the engines with wider ranges (`sdrt engines --batch/--height/"
                "--width`) or use the onnxruntime backend"
            )


def max_bytes(shape_max: Shape, itemsize: int) -> int:
    n = itemsize
    for d in shape_max:
        n *= d
    return n
