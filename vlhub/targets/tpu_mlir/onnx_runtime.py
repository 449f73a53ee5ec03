"""The ONNX networks of `vlhub.targets.tpu_mlir.onnx_export` run by onnxruntime the way the Sophgo runtime runs
their bmodel: fixed shapes, inputs padded and masks built on the host, a sequence-major KV history per layer.

    pipeline = OnnxPipeline(Path("deploy"), config)
    image_embeds = pipeline.encode_images(smoke)
    prompt_logits, tokens, token_logits = pipeline.generate(smoke, image_embeds, 4)

Prefill: the prompt padded to S runs through embedding and block_i (causal over the real tokens, -10000
elsewhere), image embeddings replacing the image pad tokens' rows; each layer's K/V past the prompt is
zeroed. Decode step t (t >= 1) embeds one token, runs block_cache_i with the history and a mask that opens
slots 0..L+t-2 and the token itself, then copies the new K/V into slot L+t-1. lm_head then greedy_head
choose every token, as LLM-TPU's models/Qwen2_VL/python_demo/chat.cpp runs the bmodel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlhub.deploy.onnx_graph import MASK_VALUE
from vlhub.errors import UserError
from vlhub.sizes import config_family
from vlhub.smoke.inputs import SmokeInput, VisionGeometry, pad_rows, padded_mask
from vlhub.smoke.reference import causal_mask
from vlhub.targets.tpu_mlir.onnx_export import LLM_DIR, VIT, network_file


class OnnxPipeline:
    """The exported networks under `out` (export_onnx's `out`), for the model of `config` (its config.json)."""

    def __init__(self, out: Path, config: dict, *, resident: bool = True) -> None:
        """`resident` keeps every network loaded; otherwise each is loaded for each use and dropped, so memory
        holds one network at a time (slow: every decode step reloads every layer)."""
        self.out = Path(out)
        self.windows = config_family(config).vision.window_attention
        self.unit = VisionGeometry.from_config(config).merge ** 2
        self.resident = resident
        self._sessions: dict[str, ort.InferenceSession] = {}
        block = self._session("block_cache_0")
        self.layers = len(list((self.out / LLM_DIR).glob("block_cache_*.onnx")))
        self.seq_length = next(i.shape[1] for i in block.get_inputs() if i.name == "history_k")
        self.patches = self._session(VIT).get_inputs()[0].shape[0]

    def encode_images(self, smoke: SmokeInput) -> np.ndarray:
        """Image embeddings [image tokens, hidden] in the reference's order: the smoke image's patches padded
        to the ViT's P rows (Qwen2.5-VL: in window order), their position ids and masks."""
        vision = smoke.vision
        if vision is None:
            raise UserError("the ONNX networks' ViT takes patch rows; this input has no vision patches")
        count, patches = len(vision.pixel_values), self.patches
        if count > patches:
            raise UserError(f"the image has {count} patches; the exported ViT takes at most {patches}")
        tokens = count // self.unit
        pixels, positions = vision.pixel_values, vision.position_ids
        full = padded_mask(vision.full_mask, patches)[None]
        masks = {"attention_mask": full}
        if self.windows:  # llm_convert's form and names for window attention
            assert vision.window_index is not None and vision.reverse_index is not None
            assert vision.window_mask is not None
            pixels, positions = (a.reshape(-1, self.unit, a.shape[-1])[vision.window_index].reshape(a.shape)
                                 for a in (pixels, positions))
            masks = {"full_attn_mask": full[None],
                     "window_attn_mask": padded_mask(vision.window_mask, patches)[None, None],
                     "reverse_index": np.concatenate([vision.reverse_index, np.arange(tokens, patches // self.unit)])
                     .astype(np.int32)}
        return self._run(VIT, input_states=pad_rows(pixels.astype(np.float32), patches),
                         position_ids=pad_rows(positions.astype(np.int32), patches), **masks)[0][:tokens]

    def generate(self, smoke: SmokeInput, image_embeds: np.ndarray, tokens: int,
                 teacher_tokens: list[int] | None = None) -> tuple[np.ndarray, list[int], np.ndarray]:
        """Greedy decoding: the prompt's logits [L, vocab], `tokens` chosen ids and the logits [tokens, vocab]
        each was chosen from. With `teacher_tokens`, step t is fed teacher_tokens[t-1] instead of the previous
        choice (so every choice can be compared with a reference's)."""
        length, seq = len(smoke.input_ids), self.seq_length
        if tokens < 1:
            raise ValueError("tokens must be at least 1")
        if teacher_tokens is not None and len(teacher_tokens) < tokens - 1:
            raise ValueError(f"{tokens} tokens need {tokens - 1} teacher tokens")
        if length + tokens - 1 > seq:
            raise UserError(f"{length} prompt tokens and {tokens} generated pass the networks' seq_length {seq}")
        ids = np.zeros((1, seq), dtype=np.int32)
        ids[0, :length] = smoke.input_ids
        x = self._run("embedding", input_ids=ids)[0]
        x[0, :length][smoke.image_mask] = image_embeds
        positions = np.zeros((3, 1, seq), dtype=np.int64)
        positions[:, 0, :length] = smoke.position_ids
        mask = np.full((1, 1, seq, seq), MASK_VALUE, dtype=np.float32)
        mask[0, 0, :length, :length] = np.where(causal_mask(length, 0) < 0, MASK_VALUE, 0)
        history = []
        for layer in range(self.layers):
            x, k, v = self._run(f"block_{layer}", input_states=x, position_ids=positions, attention_mask=mask)
            k[:, length:] = 0
            v[:, length:] = 0
            history.append((k, v))
        prompt_logits = self._logits(x[0, :length])
        chosen_from = [prompt_logits[-1]]
        generated = [self._greedy(prompt_logits[-1:])]
        for step in range(1, tokens):
            fed = teacher_tokens[step - 1] if teacher_tokens is not None else generated[-1]
            slot = length + step - 1
            x = self._run("embedding_cache", input_ids=np.array([[fed]], dtype=np.int32))[0]
            position = smoke.positions_after(step)[:, -1].reshape(3, 1, 1)
            step_mask = np.zeros((1, 1, 1, seq + 1), dtype=np.float32)
            step_mask[..., slot:seq] = MASK_VALUE
            for layer, (history_k, history_v) in enumerate(history):
                x, k, v = self._run(f"block_cache_{layer}", input_states=x, position_ids=position,
                                    attention_mask=step_mask, history_k=history_k, history_v=history_v)
                history_k[:, slot] = k[:, 0]
                history_v[:, slot] = v[:, 0]
            logits = self._logits(x[0])
            chosen_from.append(logits[0])
            generated.append(self._greedy(logits))
        return prompt_logits, generated, np.stack(chosen_from)

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [n, vocab] of hidden states [n, hidden], one row at a time as lm_head takes them."""
        session = self._session("lm_head")
        return np.concatenate([session.run(None, {"hidden_states": row[None]})[0] for row in hidden])

    def _greedy(self, logits: np.ndarray) -> int:
        return int(self._run("greedy_head", m_logits=logits)[0][0, 0])

    def _run(self, network: str, **inputs: np.ndarray) -> list[np.ndarray]:
        return self._session(network).run(None, inputs)

    def _session(self, network: str) -> ort.InferenceSession:
        session = self._sessions.get(network)
        if session is None:
            path = self.out / network_file(network)
            if not path.is_file():
                raise UserError(f"no {path}: export the ONNX networks first")
            options = ort.SessionOptions()
            options.log_severity_level = 3  # warnings about initializers it folds are noise here
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            if self.resident:
                self._sessions[network] = session
        return session


def onnx_outputs(out: Path, config: dict, smoke: SmokeInput, teacher_tokens: list[int], *,
                 resident: bool = True) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """What `vlhub.smoke.run` compares with the reference: image embeddings, the prompt's logits [L, vocab] and
    the greedy choice at each of len(teacher_tokens) positions, teacher-forced with the reference's tokens."""
    pipeline = OnnxPipeline(out, config, resident=resident)
    image_embeds = pipeline.encode_images(smoke)
    prompt_logits, tokens, _ = pipeline.generate(smoke, image_embeds, len(teacher_tokens), teacher_tokens)
    return image_embeds, prompt_logits, tokens
