"""Families' networks in paddle.nn (dygraph) over converted Paddle weights: the layers they share, the weights'
loading, and `PaddleForward`, which runs a family's network resident or streamed. Each family's own network is
`vlhub/families/<family>/paddle.py`, a `PaddleFamily` subclass named `Network`.

The networks mirror the parameter names of the Paddle loader of their family (`[paddle] layout` in its
family.toml, PaddleMIX's `paddlemix` by default; Qwen3-VL's is PaddleFormers', the official names), and the
weights are read from the file that loader reads, in that layout's format. A checkpoint in another Paddle
layout its family's key map declares (Qwen-VL's `paddle-inference`: `qwen.h.N.*`, `qwen.wte`, `qwen.ln_f`)
is read through the key map, each network name spelt in the checkpoint's layout; checks report the
checkpoint's own names. A family whose loader transposes some kinds as it reads them (`[paddle]
transpose_at_load`: PaddleFormers turns the stored torch [out, in] Linear weights into Paddle's [in, out])
has them transposed here the same way. Resident, the whole network is built and loaded as Paddle users
load it (pdparams: `paddle.load` of each shard, its keys renamed to the network's, `set_state_dict`;
safetensors: each tensor read by name, transposed where the loader does); streamed, the same layer classes
are built one block at a time and filled from vlhub's lazy reader, so memory holds one block's weights,
never the model (a layer that is an `OnDemand` reads its tensors in parts as it uses them: one expert of
a mixture at a time). Weights of any float dtype (bfloat16, float16, float32) are cast to float32 as they
load, except a streamed decoder layer's: its parameters take the half-precision dtype its weights are stored
in (a 72B layer is 1.76 GB in bfloat16, 3.5 GB in float32), and each is cast to float32 where it is used, one
at a time (exact). Everything computes in float32. The forwards take masks and index orders as tensors and branch only on
configuration, so the resident networks can go through `paddle.jit.to_static`. Parameters may be
created narrower than float32 (a static export keeps the checkpoint's dtype); they are cast to float32
where they are used. Facts: docs/facts/paddle.md#qwen2-vl-names, #qwen-vl-paddlemix-names, #pdparams.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from vlhub.convert.layouts import UNKNOWN, detect_layout
from vlhub.convert.ops import swapped_shape, transpose_last
from vlhub.errors import CheckFailed, UserError
from vlhub.family_registry import FAMILIES, family_of_config
from vlhub.formats.io_utils import read_json_file
from vlhub.formats.readers import MAX_CONFIG_BYTES, Checkpoint, open_checkpoint
from vlhub.formats.registry import FORMATS
from vlhub.formats.tensors import float32_values
from vlhub.keymaps import Layout, load_keymap
from vlhub.smoke.weights import MappedTensors

MASKED = -1e30  # additive mask value: finite, so a fully masked row gives no NaN
HEAD_BLOCK = 4096  # lm_head columns (or tied embedding rows) per block in streamed mode
NETWORK_LAYOUT = "paddlemix"  # the key-map layout whose names the networks' parameters have, unless [paddle] says
_SHOWN_KEYS = 8


# ---------------------------------------------------------------------------------------------------
# Layers the families share


def as_float32(value: paddle.Tensor | None) -> paddle.Tensor | None:
    """A parameter as float32, whatever dtype it is stored in (None stays None)."""
    return value if value is None or value.dtype == paddle.float32 else value.astype("float32")


class RMSNorm(nn.Layer):
    """Weight-only RMS normalisation."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([width], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * paddle.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * as_float32(self.weight)


class Linear(nn.Linear):
    """nn.Linear computing in float32 over weights of any float dtype."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.linear(x, as_float32(self.weight), as_float32(self.bias))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computing in float32 over weights of any float dtype."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.layer_norm(x, self._normalized_shape, as_float32(self.weight), as_float32(self.bias), self._epsilon)


def linear(width_in: int, width_out: int, *, bias: bool = True) -> Linear:
    return Linear(width_in, width_out, bias_attr=None if bias else False)


def rotate(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """Rotary embedding, rotate-half convention: x*cos + rotate_half(x)*sin."""
    first, second = paddle.split(x, 2, axis=-1)
    return x * cos + paddle.concat([-second, first], axis=-1) * sin


def attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, mask: paddle.Tensor | None) -> paddle.Tensor:
    """Softmax attention over [..., heads, seq, head_dim], scaled by 1/sqrt(head_dim), plus an additive mask."""
    scores = paddle.matmul(q, k, transpose_y=True) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask
    return paddle.matmul(F.softmax(scores, axis=-1), v)


Cache = tuple[paddle.Tensor, paddle.Tensor]  # one layer's keys (rotated) and values, [kv_heads, T, head_dim]


def extend(past: Cache | None, k: paddle.Tensor, v: paddle.Tensor) -> Cache:
    """The cached keys and values followed by the new ones, along the sequence axis."""
    if past is None:
        return k, v
    return paddle.concat([past[0], k], axis=1), paddle.concat([past[1], v], axis=1)


def causal_mask(h: paddle.Tensor) -> paddle.Tensor:
    positions = paddle.arange(paddle.shape(h)[0])
    return (positions.unsqueeze(0) > positions.unsqueeze(1)).astype("float32") * MASKED


def merge_image_embeds(h: paddle.Tensor, image_embeds: paddle.Tensor, image_mask: paddle.Tensor) -> paddle.Tensor:
    """Replace the hidden states where `image_mask` is set by the rows of `image_embeds`, in order."""
    marks = image_mask.astype("int64")
    # row 0 is a placeholder the unmarked positions gather, so no image at all needs no branch
    table = paddle.concat([paddle.zeros([1, h.shape[-1]], "float32"), image_embeds])
    chosen = image_mask.astype("float32").unsqueeze(-1)
    # selecting by arithmetic is exact for finite values, and paddle.where warns when traced for export
    return h * (1 - chosen) + paddle.gather(table, paddle.cumsum(marks) * marks) * chosen


def inverse_frequencies(dim: int, base: float) -> paddle.Tensor:
    return paddle.to_tensor(1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))


class GatedMLP(nn.Layer):
    """down(act(gate(x)) * up(x)): SwiGLU (`act` SiLU by default), with or without biases."""

    def __init__(self, width: int, inner: int, *, bias: bool,
                 act: Callable[[paddle.Tensor], paddle.Tensor] = F.silu) -> None:
        super().__init__()
        self.act = act
        self.gate_proj = linear(width, inner, bias=bias)
        self.up_proj = linear(width, inner, bias=bias)
        self.down_proj = linear(inner, width, bias=bias)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))



class PreNormLayer(nn.Layer):
    """A decoder layer: x + attention(norm(x)), then + mlp(norm(x)). Subclasses own the four parts under their
    PaddleMIX names and return them from `parts`."""

    def parts(self) -> tuple[nn.Layer, nn.Layer, nn.Layer, nn.Layer]:
        """The attention's norm, the attention, the MLP's norm, the MLP."""
        raise NotImplementedError

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        return self.step(x, cos, sin, mask)[0]

    def step(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, mask: paddle.Tensor | None,
             past: Cache | None = None) -> tuple[paddle.Tensor, Cache]:
        """The layer's output for new tokens `x` after `past`, and its keys and values extended by x's."""
        attention_norm, attention, mlp_norm, mlp = self.parts()
        out, cache = attention(attention_norm(x), cos, sin, mask, past)
        x = x + out
        return x + mlp(mlp_norm(x)), cache


class TextModel(nn.Layer):
    """A language model: embedding (resident only), decoder layers, final norm. Subclasses name the children as
    PaddleMIX does: `embedding_key` (the table's parameter), `layers_key`, and `final_norm`."""

    embedding_key: str
    layers_key: str
    rotary: nn.Layer

    def final_norm(self, h: paddle.Tensor) -> paddle.Tensor:
        raise NotImplementedError

    def prepare(self, h: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        """The first layer's input, rotary cos/sin and causal mask, from the token embeddings `h`."""
        cos, sin = self.rotary(position_ids)
        return merge_image_embeds(h, image_embeds, image_mask), cos, sin, causal_mask(h)

    def after_layer(self, index: int, h: paddle.Tensor, image_embeds: paddle.Tensor,
                    image_mask: paddle.Tensor) -> paddle.Tensor:
        """Decoder layer `index`'s output as the next layer takes it: as it is (DeepStack adds image features)."""
        return h

    def stream_layer(self, dims: object) -> nn.Layer:
        """The layer each decoder layer's weights fill in turn when streamed."""
        return self.layer_class(dims)

    def forward(self, input_ids: paddle.Tensor, position_ids: paddle.Tensor, image_embeds: paddle.Tensor,
                image_mask: paddle.Tensor) -> paddle.Tensor:
        embedding = getattr(self, self.embedding_key.removesuffix(".weight"))
        h, cos, sin, mask = self.prepare(embedding(input_ids), position_ids, image_embeds, image_mask)
        for index, layer in enumerate(getattr(self, self.layers_key)):
            h = self.after_layer(index, layer(h, cos, sin, mask), image_embeds, image_mask)
        return self.final_norm(h)


# ---------------------------------------------------------------------------------------------------
# What a family supplies


class PaddleFamily:
    """A family's Paddle network as `PaddleForward` and the Paddle Inference export drive it. Each family's
    `paddle.py` defines `Network(PaddleFamily)` from its config.json: the resident network, its vision tower run
    one block at a time, its text model's parts, and the shapes of its inputs."""

    text_prefix = ""  # PaddleMIX's prefix of the text model's parameters (`model.`, ...)
    limit_name = "max_position_embeddings"  # the config field past which the network does not compute as the model

    def __init__(self, config: dict) -> None:
        raise NotImplementedError

    # what every runner needs to know
    dims: object  # the family's dims, which its layer classes take
    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    position_limit: int
    positions_rows: int | None  # 3 for multimodal rotary positions [3, L]; None for [L]

    def build(self) -> nn.Layer:
        """The whole network (children `visual`, the text model, `lm_head`), as PaddleMIX names them."""
        raise NotImplementedError

    def vision_tensors(self, pixel_values: np.ndarray, vision_inputs: dict[str, np.ndarray]) -> list[paddle.Tensor]:
        """The vision tower's inputs, checked and as tensors, in the order `visual` takes them."""
        raise NotImplementedError

    def stream_vision(self, weights: StreamedWeights, tensors: list[paddle.Tensor]) -> paddle.Tensor:
        """The vision tower with one block's weights in memory at a time."""
        raise NotImplementedError

    def text_model(self, net: nn.Layer | None = None) -> TextModel:
        """The resident network's text model, or (no `net`) one without layers or embedding to stream through."""
        raise NotImplementedError

    def vision(self, net: nn.Layer) -> nn.Layer:
        """The resident network's vision tower, which takes `vision_tensors`."""
        return net.visual

    def image_embeds_shape(self, marked: int) -> tuple[int, ...]:
        """The shape of the image embeddings the text model takes for `marked` image positions (the vision
        tower's output): [marked, hidden], or with DeepStack [1 + features, marked, hidden]."""
        return (marked, self.hidden)

    def head(self, net: nn.Layer) -> paddle.Tensor:
        """The output projection: lm_head's [hidden, vocab] weight, or (tied) the [vocab, hidden] embedding."""
        raise NotImplementedError

    def vision_graph(self, net: nn.Layer) -> tuple[Callable, list]:
        """The function a static vision graph traces and its `paddle.static.InputSpec`s."""
        raise NotImplementedError

    @property
    def head_dim(self) -> int:
        """The width of one attention head (and of a KV cache row): hidden / heads unless the family has its own."""
        return self.hidden // self.heads

    @property
    def deepstack(self) -> int:
        """How many decoder layers' outputs gain image features at the image positions (DeepStack: feature j after
        layer j), as `image_embeds_shape` gives them: 0 when the image embeddings are [marked, hidden]."""
        shape = self.image_embeds_shape(1)
        return shape[0] - 1 if len(shape) == 3 else 0

    def positions_shape(self, length: int | None) -> tuple[int | None, ...]:
        """The shape of `length` tokens' positions (None: any length, as a static graph takes them)."""
        return (length,) if self.positions_rows is None else (self.positions_rows, length)


def family_network(path: Path, config: dict | None) -> tuple[str, PaddleFamily]:
    """The family of the checkpoint at `path` and its Paddle network, from its config.json."""
    family = family_of_config(config)
    if family is None:
        raise UserError(f"{path}: config.json names no model_type vlhub has a network for")
    try:
        return family.name, family.code("paddle").Network(config)
    except KeyError as exc:
        raise UserError(f"{path}/config.json lacks {exc.args[0]!r}") from None


def pdparams_entry(path: Path) -> Path:
    return _entry(path, "pdparams")


def _entry(path: Path, format_name: str) -> Path:
    """The index or single file of `format_name` weights in `path`, as Paddle's loaders look for them."""
    fmt = FORMATS[format_name]
    for name in (fmt.index_file, fmt.single_file):
        if (path / name).is_file():
            return path / name
    raise UserError(f"no {fmt.single_file}[.index.json] in {path}: convert it first (vlhub convert SRC --to paddle)")


def paddle_layout(family: str) -> tuple[Layout, frozenset[str]]:
    """The key-map layout of the family's Paddle weights, whose names its network's parameters have (`[paddle]
    layout`, PaddleMIX's by default), and the tensor kinds its loader transposes as it reads them (`[paddle]
    transpose_at_load`: none by default)."""
    facts = FAMILIES[family].paddle_facts
    layout = load_keymap(family).layout(facts.get("layout", NETWORK_LAYOUT))
    return layout, frozenset(facts.get("transpose_at_load", ()))


def weights_entry(path: Path) -> tuple[Path, bool | None]:
    """The weight file (or index) in `path` that the Paddle loader of the checkpoint's family reads, in the format
    of the family's Paddle layout, and how to open it: pdparams read as Paddle does (uint16 is bfloat16), other
    formats by their own dtypes. Without a config.json naming a family vlhub knows: the pdparams."""
    config_path = path / "config.json"
    config = read_json_file(config_path, MAX_CONFIG_BYTES) if config_path.is_file() else None
    family = family_of_config(config) if isinstance(config, dict) else None
    format_name = (paddle_layout(family.name)[0].format if family is not None else None) or "pdparams"
    return _entry(path, format_name), True if format_name == "pdparams" else None


# ---------------------------------------------------------------------------------------------------
# Weights


class StreamedWeights:
    """Layer weights read tensor by tensor from a converted checkpoint, decoded to float32.

    Every method takes network names; `names` gives the checkpoint's name for each (default: the same), and
    the tensors named in `transposed` are stored with their last two axes swapped relative to the network's
    parameters (torch [out, in] Linear weights a PaddleFormers loader transposes as it reads them)."""

    def __init__(self, checkpoint: Checkpoint, names: dict[str, str] | None = None,
                 transposed: frozenset[str] | set[str] = frozenset(), *, read_ahead: bool = False) -> None:
        """`read_ahead`: map the tensors and have each layer's read while the one before computes (`MappedTensors`)."""
        self.checkpoint = checkpoint
        self.names = names or {}
        self.transposed = frozenset(transposed)
        self._mapped = MappedTensors(checkpoint, self.names) if read_ahead else None
        self._buffer = np.empty(0, dtype=np.uint32)

    def stored(self, name: str) -> str:
        """The checkpoint's name for the network's tensor `name`."""
        return self.names.get(name, name)

    def read(self, name: str) -> np.ndarray:
        stored = self.stored(name)
        values = self._mapped.read(name) if self._mapped is not None else self.checkpoint.read(stored)
        values = _float32(values, self.checkpoint.tensors[stored].dtype)
        return transpose_last(values) if name in self.transposed else values

    def stored_dtype(self, prefix: str) -> str:
        """The half-precision dtype (bfloat16, float16) every tensor whose network name starts with `prefix` is
        stored in, if they share one; float32 otherwise. A streamed layer built in it (`built_in`) is filled
        with the stored values as they are."""
        dtypes = {self.checkpoint.tensors[self.stored(name)].dtype
                  for name in self.names or self.checkpoint.tensors if name.startswith(prefix)}
        return dtypes.pop() if len(dtypes) == 1 and dtypes <= {"bfloat16", "float16"} else "float32"

    def fill(self, layer: nn.Layer, prefix: str) -> nn.Layer:
        """`layer` with every parameter set from the checkpoint tensor `prefix` + its name, one tensor at a time
        (memory holds the layer and one tensor's decoded copy; none for a parameter in the stored dtype), and
        each of its `OnDemand` parts told where to read its own tensors when it uses them."""
        for key, parameter in layer.state_dict().items():
            name = prefix + key
            parameter.set_value(self._decoded(name) if parameter.dtype == paddle.float32 else self._as_stored(name))
        for name, part in layer.named_sublayers(include_self=True):
            if isinstance(part, OnDemand):
                part.attach(self, f"{prefix}{name}." if name else prefix)
        return layer

    def _as_stored(self, name: str) -> np.ndarray:
        """`name`'s stored values undecoded (bfloat16 as the uint16 bits Paddle's set_value takes), in the
        network's orientation."""
        stored = self.stored(name)
        values = self._mapped.read(name) if self._mapped is not None else self.checkpoint.read(stored)
        return transpose_last(values) if name in self.transposed else values

    def _decoded(self, name: str) -> np.ndarray:
        """`read(name)`, bfloat16 decoded into one buffer that every call reuses (a 7B pass decodes 28 GB: in
        fresh memory each time, faulting it in cost more than the decoding). Valid until the next call."""
        stored = self.stored(name)
        meta = self.checkpoint.tensors[stored]
        if self._mapped is None or meta.dtype != "bfloat16" or name in self.transposed:
            return self.read(name)
        if self._buffer.size < meta.numel:
            self._buffer = np.empty(meta.numel, dtype=np.uint32)
        out = self._buffer[:meta.numel].reshape(meta.shape)
        np.left_shift(self._mapped.read(name), 16, out=out, dtype=np.uint32, casting="unsafe")
        return out.view(np.float32)

    def rows(self, name: str, ids: np.ndarray) -> paddle.Tensor:
        """Rows `ids` of a 2-D table, reading only those rows."""
        return paddle.to_tensor(self.slices(name, ids))

    def slices(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Entries `ids` along the first axis of a tensor (rows of a table, experts of a stacked expert
        tensor) as float32, reading only those."""
        if name in self.transposed:
            raise ValueError(f"{name} is stored transposed: its entries are not rows of the stored tensor")
        stored = self.stored(name)
        return _float32(self.checkpoint.read_rows(stored, ids), self.checkpoint.tensors[stored].dtype)

    def head(self, h: paddle.Tensor, name: str, *, tied: bool) -> np.ndarray:
        """h @ lm_head in blocks: `name` is [hidden, vocab] (Paddle's lm_head) or [vocab, hidden] (tied, the
        embedding table; or a torch-layout lm_head the loader transposes)."""
        stored = self.stored(name)
        dtype = self.checkpoint.tensors[stored].dtype
        by_rows = tied or name in self.transposed
        blocks = self.checkpoint.iter_blocks(stored, HEAD_BLOCK, axis=0 if by_rows else 1)
        return np.concatenate(
            [paddle.matmul(h, paddle.to_tensor(_float32(block, dtype)), transpose_y=by_rows).numpy()
             for block in blocks],
            axis=1,
        )


    def close(self) -> None:
        """Stop reading ahead; close the checkpoint."""
        if self._mapped is not None:
            self._mapped.close()
        self.checkpoint.close()


class OnDemand(nn.Layer):
    """A part of a streamed network that reads its tensors when it uses them, a piece at a time (the experts of a
    mixture, one expert's slice each), rather than when its layer is filled: `StreamedWeights.fill` attaches the
    weights and the prefix its tensors' names start with."""

    weights: StreamedWeights | None = None
    prefix = ""

    def attach(self, weights: StreamedWeights, prefix: str) -> None:
        self.weights, self.prefix = weights, prefix

    def slices(self, name: str, ids: np.ndarray) -> paddle.Tensor:
        """Entries `ids` along the first axis of this part's tensor `name`, read now."""
        if self.weights is None:
            raise RuntimeError(f"{type(self).__name__} reads its tensors from the weights a fill attaches")
        return paddle.to_tensor(self.weights.slices(self.prefix + name, ids))


def _float32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype not in ("bfloat16", "float16", "float32", "float64"):
        raise CheckFailed(f"a {dtype} tensor where the network needs floating-point weights")
    return float32_values(values, dtype)


def _parameter_shapes(net: nn.Layer) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in net.state_dict().items()}


def _stored_names(checkpoint: Checkpoint, family: str,
                  network_names: Iterable[str]) -> tuple[dict[str, str], frozenset[str]]:
    """The checkpoint's name for each network name, through the family's key map: the network's layout
    (the family's Paddle layout) to official names to the layout the checkpoint's names are in; and the network
    names whose kind the family's loader transposes as it reads them. A checkpoint in no layout the key map
    declares is taken as the network's names, and the fit check lists what does not fit."""
    keymap = load_keymap(family)
    network, at_load = paddle_layout(family)
    detected = detect_layout(family, checkpoint.tensors, checkpoint.config)
    stored = network if detected == UNKNOWN else keymap.layouts[detected]
    if stored.transpose != network.transpose:
        if network.transposes("linear") and not stored.transposes("linear"):
            raise CheckFailed(f"{checkpoint.root}: the weights are in the {detected} layout, which stores Linear "
                              "weights as torch does ([out, in]); the Paddle network takes a Paddle layout ([in, out])")
        raise CheckFailed(f"{checkpoint.root}: the weights are in the {detected} layout ({stored.description}); "
                          f"the Paddle network reads the {network.name} layout ({network.description})")
    names, transposed = {}, set()
    for name in network_names:
        official = network.to_official(name)
        names[name] = stored.from_official(official)
        rule = keymap.rule_for(official) if at_load else None
        if rule is not None and rule.kind in at_load:
            transposed.add(name)
    return names, frozenset(transposed)


def _check_fit(path: Path, family: str, expected: dict[str, tuple[int, ...]],
               found: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckFailed naming every missing, unexpected and mis-shaped key (`expected` and `found` both
    by the checkpoint's names)."""
    problems = {
        "missing": [name for name in expected if name not in found],
        "unexpected": [name for name in found if name not in expected],
        "mis-shaped": [f"{name} {list(found[name])} (network {list(expected[name])})"
                       for name in expected if name in found and tuple(found[name]) != expected[name]],
    }
    listed = [f"{kind} ({len(names)}): {', '.join(names[:_SHOWN_KEYS])}{', ...' if len(names) > _SHOWN_KEYS else ''}"
              for kind, names in problems.items() if names]
    if listed:
        raise CheckFailed(f"{path}: the weights do not fit the {family} network its config.json describes; "
                          + "; ".join(listed))


def _stored_shapes(expected: dict[str, tuple[int, ...]], names: dict[str, str],
                   transposed: frozenset[str] = frozenset()) -> dict[str, tuple[int, ...]]:
    """The network's parameter shapes by the checkpoint's names, as stored (`transposed` ones swapped)."""
    return {names[name]: swapped_shape(shape) if name in transposed else shape for name, shape in expected.items()}


def _load_shards(net: nn.Layer, checkpoint: Checkpoint, family: str, names: dict[str, str],
                 transposed: frozenset[str] = frozenset()) -> None:
    """paddle.load each shard and set_state_dict the tensors that fit, renamed to the network's names (and
    transposed where the family's loader does) and cast to float32; then check."""
    expected = _parameter_shapes(net)
    stored_shapes = _stored_shapes(expected, names, transposed)
    network_name = {stored: name for name, stored in names.items()}
    found: dict[str, tuple[int, ...]] = {}
    for shard in checkpoint.shards:
        state = paddle.load(str(checkpoint.root / shard))
        fitting = {}
        for stored, tensor in state.items():
            found[stored] = tuple(tensor.shape)
            name = network_name.get(stored)
            if name is not None and stored_shapes[stored] == found[stored]:
                fitting[name] = as_float32(tensor)
                if name in transposed:
                    fitting[name] = fitting[name].transpose([*range(tensor.ndim - 2), tensor.ndim - 1, tensor.ndim - 2])
        with warnings.catch_warnings():
            # each shard holds a part of the network: Paddle would warn about every other part
            warnings.filterwarnings("ignore", message="Skip loading for")
            net.set_state_dict(fitting)
        del state, fitting
    _check_fit(checkpoint.root, family, stored_shapes, found)


def _load_tensors(net: nn.Layer, checkpoint: Checkpoint, family: str, names: dict[str, str],
                  transposed: frozenset[str]) -> None:
    """Check, then set every parameter from the checkpoint tensor of its name, one tensor at a time in shard
    order, transposed where the family's loader does (PaddleFormers' way with safetensors: each tensor read by
    its name, Linear weights turned to [in, out] as they load), cast to float32."""
    expected = _parameter_shapes(net)
    _check_fit(checkpoint.root, family, _stored_shapes(expected, names, transposed),
               {name: meta.shape for name, meta in checkpoint.tensors.items()})
    weights = StreamedWeights(checkpoint, names, transposed)
    shard_order = {shard: i for i, shard in enumerate(checkpoint.shards)}
    parameters = net.state_dict()
    for name in sorted(expected, key=lambda n: shard_order[checkpoint.tensors[names[n]].shard]):
        parameters[name].set_value(weights.read(name))




# ---------------------------------------------------------------------------------------------------
# The forward


class PaddleForward:
    """One family's Paddle network over a converted checkpoint directory."""

    def __init__(self, path: Path, *, streamed: bool) -> None:
        self.path = Path(path)
        self.streamed = streamed
        self._net: nn.Layer | None = None
        self._weights: StreamedWeights | None = None
        entry, bf16 = weights_entry(self.path)
        checkpoint = open_checkpoint(entry, bf16=bf16)
        try:
            self.family, self.network = family_network(self.path, checkpoint.config)
            if streamed:
                with paddle.LazyGuard():  # shapes only: nothing is allocated
                    expected = _parameter_shapes(self.network.build())
                names, transposed = _stored_names(checkpoint, self.family, expected)
                _check_fit(self.path, self.family, _stored_shapes(expected, names, transposed),
                           {n: m.shape for n, m in checkpoint.tensors.items()})
                self._weights = StreamedWeights(checkpoint, names, transposed, read_ahead=True)
            else:
                self._net = self.network.build()
                self._net.eval()
                names, transposed = _stored_names(checkpoint, self.family, self._net.state_dict())
                if checkpoint.format.name == "pdparams":
                    _load_shards(self._net, checkpoint, self.family, names, transposed)
                else:
                    _load_tensors(self._net, checkpoint, self.family, names, transposed)
        finally:
            if self._weights is None:
                checkpoint.close()

    @property
    def net(self) -> nn.Layer | None:
        """The resident network (None when streamed), e.g. for paddle.jit.to_static."""
        return self._net

    def encode_images(self, pixel_values: np.ndarray, **vision_inputs: np.ndarray) -> np.ndarray:
        """Image features [n_image_tokens, hidden] float32, from the pixels (or patches) and the host-side tables
        the family's vision tower takes (`SmokeInput.vision.as_kwargs()`)."""
        tensors = self.network.vision_tensors(pixel_values, vision_inputs)
        with paddle.no_grad():
            if self._net is not None:
                return self.network.vision(self._net)(*tensors).numpy()
            return self.network.stream_vision(self._weights, tensors).numpy()

    def logits(self, input_ids: np.ndarray, position_ids: np.ndarray, image_embeds: np.ndarray,
               image_mask: np.ndarray) -> np.ndarray:
        """Causal logits [L, vocab] float32; the positions `image_mask` marks take `image_embeds` rows in order."""
        ids, positions, embeds, mask = self._text_inputs(input_ids, position_ids, image_embeds, image_mask)
        with paddle.no_grad():
            if self._net is not None:
                return self._net(ids, positions, embeds, mask).numpy()
            return self._stream_logits(ids, positions, embeds, mask)

    def close(self) -> None:
        """Close the streamed checkpoint's open shard (resident weights need nothing)."""
        if self._weights is not None:
            self._weights.close()

    def _text_inputs(self, input_ids: np.ndarray, position_ids: np.ndarray, image_embeds: np.ndarray,
                     image_mask: np.ndarray) -> tuple[paddle.Tensor, ...]:
        network = self.network
        length = len(input_ids)
        if input_ids.ndim != 1 or not length:
            raise ValueError(f"input_ids must be a non-empty 1-D array, not {list(input_ids.shape)}")
        if input_ids.min() < 0 or input_ids.max() >= network.vocab:
            raise ValueError(f"input_ids must lie in [0, {network.vocab})")
        if length > network.position_limit:
            raise UserError(f"{length} tokens: the forward here stops at {network.limit_name} "
                            f"{network.position_limit}")
        if position_ids.shape != network.positions_shape(length):
            raise ValueError(f"position_ids is {list(position_ids.shape)}; expected "
                             f"{list(network.positions_shape(length))}")
        mask = np.asarray(image_mask, dtype=bool)
        if mask.shape != (length,) or image_embeds.shape != network.image_embeds_shape(int(mask.sum())):
            wanted = ", ".join("marked positions" if d == -1 else str(d) for d in network.image_embeds_shape(-1))
            raise ValueError(f"image_mask must be [{length}] and image_embeds [{wanted}], "
                             f"not {list(mask.shape)} and {list(image_embeds.shape)}")
        return int_tensor(input_ids), int_tensor(position_ids), float_tensor(image_embeds), paddle.to_tensor(mask)

    def _stream_logits(self, ids: paddle.Tensor, positions: paddle.Tensor, embeds: paddle.Tensor,
                       mask: paddle.Tensor) -> np.ndarray:
        """The resident text model's forward with one layer's weights in memory at a time."""
        network, prefix = self.network, self.network.text_prefix
        text = self._weights.fill(network.text_model(), prefix)
        layer, dtype = None, None
        embedding = prefix + text.embedding_key
        h, cos, sin, causal = text.prepare(self._weights.rows(embedding, ids.numpy()), positions, embeds, mask)
        for i in range(network.layers):
            at = f"{prefix}{text.layers_key}.{i}."
            if self._weights.stored_dtype(at) != dtype:  # the first layer, or one stored in another dtype
                layer, dtype = None, self._weights.stored_dtype(at)  # the previous layer freed before the next
                layer = built_in(dtype, lambda: text.stream_layer(network.dims))
            h = text.after_layer(i, self._weights.fill(layer, at)(h, cos, sin, causal), embeds, mask)
        return self._weights.head(text.final_norm(h), embedding if network.tied else "lm_head.weight",
                                  tied=network.tied)


def built_in(dtype: str, make: Callable[[], nn.Layer]) -> nn.Layer:
    """`make()`'s layer with its parameters created in `dtype` (never in float32 first)."""
    before = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        return make()
    finally:
        paddle.set_default_dtype(before)


def float_tensor(values: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(np.ascontiguousarray(values, dtype=np.float32))


def int_tensor(values: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(np.ascontiguousarray(values, dtype=np.int64))
