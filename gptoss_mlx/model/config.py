"""Model configuration: gpt-oss-20b's hyper-parameters, read from and validated against config.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"

# Upper bounds that reject absurd (or hostile) configs before anything is allocated.
_MAX_LAYERS = 256
_MAX_HEADS = 1024
_MAX_HIDDEN = 65536
_MAX_VOCAB = 1 << 22
_MAX_EXPERTS = 1024
_MAX_CONTEXT = 1 << 21


@dataclass
class ModelConfig:
    """gpt-oss hyper-parameters; the defaults are gpt-oss-20b's (Hugging Face `config.json` names)."""

    num_hidden_layers: int = 24
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    vocab_size: int = 201088
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    rope_theta: float = 150000.0
    # YaRN (https://arxiv.org/abs/2309.00071) as in the reference: factor 32 over 4096 positions.
    rope_scaling_factor: float = 32.0
    initial_context_length: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    max_position_embeddings: int = 131072
    layer_types: list[str] = field(default_factory=list)
    model_type: str = "gpt_oss"

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        # Only for a sane layer count: validate() reports a bad one (and a hostile 10**9 must not
        # build a billion-entry list first).
        if not self.layer_types and type(n) is int and 1 <= n <= _MAX_LAYERS:
            # The reference: even layers slide over 128 tokens, odd layers attend to everything.
            self.layer_types = [
                SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers)
            ]

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face-style (or converted) config dict and validate it."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        mt = d.get("model_type", "gpt_oss")
        if mt != "gpt_oss":
            raise ConfigError(f"{source}: model_type is {mt!r}, expected 'gpt_oss'")
        kw: dict[str, Any] = {}
        names = {f for f in cls.__dataclass_fields__}
        for k in names:
            if k in d:
                kw[k] = d[k]
        if "num_experts_per_tok" not in d and "experts_per_token" in d:
            kw["num_experts_per_tok"] = d["experts_per_token"]
        rs = d.get("rope_scaling")
        if rs is not None:
            if not isinstance(rs, dict):
                raise ConfigError(f"{source}: rope_scaling must be an object")
            rt = rs.get("rope_type", rs.get("type", "yarn"))
            if rt != "yarn":
                raise ConfigError(
                    f"{source}: rope_scaling.rope_type {rt!r} is not supported (yarn)"
                )
            kw["rope_scaling_factor"] = rs.get("factor", cls.rope_scaling_factor)
            kw["rope_beta_fast"] = rs.get("beta_fast", cls.rope_beta_fast)
            kw["rope_beta_slow"] = rs.get("beta_slow", cls.rope_beta_slow)
            if "original_max_position_embeddings" in rs:
                kw["initial_context_length"] = rs["original_max_position_embeddings"]
        cfg = cls(**kw)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_original(cls, d: dict[str, Any], source: str = "original/config.json") -> ModelConfig:
        """Build from OpenAI's own `original/config.json` names."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        m = {
            "num_hidden_layers": "num_hidden_layers",
            "hidden_size": "hidden_size",
            "intermediate_size": "intermediate_size",
            "num_attention_heads": "num_attention_heads",
            "num_key_value_heads": "num_key_value_heads",
            "head_dim": "head_dim",
            "vocab_size": "vocab_size",
            "num_local_experts": "num_experts",
            "num_experts_per_tok": "experts_per_token",
            "sliding_window": "sliding_window",
            "swiglu_limit": "swiglu_limit",
            "rope_theta": "rope_theta",
            "rope_scaling_factor": "rope_scaling_factor",
            "initial_context_length": "initial_context_length",
            "rope_beta_slow": "rope_ntk_alpha",
            "rope_beta_fast": "rope_ntk_beta",
        }
        kw = {ours: d[theirs] for ours, theirs in m.items() if theirs in d}
        cfg = cls(**kw)
        cfg.validate(source)  # first, so the product below only sees sane numbers
        if "max_position_embeddings" not in d:
            cfg.max_position_embeddings = int(
                cfg.initial_context_length * max(cfg.rope_scaling_factor, 1.0)
            )
            cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, 5000-digit numbers, nesting
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        """Check types and bounds; raises ConfigError naming the field."""

        def need_int(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"{source}: {name} must be an integer in [{lo}, {hi}], got {v!r}")

        def need_float(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            # ints are always finite (and math.isfinite would overflow on a huge one)
            finite = isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))
            if isinstance(v, bool) or not finite:
                raise ConfigError(f"{source}: {name} must be a finite number, got {v!r}")
            if not lo <= v <= hi:
                raise ConfigError(f"{source}: {name} must be in [{lo}, {hi}], got {v!r}")
            setattr(self, name, float(v))

        need_int("num_hidden_layers", 1, _MAX_LAYERS)
        need_int("hidden_size", 1, _MAX_HIDDEN)
        need_int("intermediate_size", 1, _MAX_HIDDEN)
        need_int("num_attention_heads", 1, _MAX_HEADS)
        need_int("num_key_value_heads", 1, _MAX_HEADS)
        need_int("head_dim", 2, 1024)
        need_int("vocab_size", 1, _MAX_VOCAB)
        need_int("num_local_experts", 1, _MAX_EXPERTS)
        need_int("num_experts_per_tok", 1, self.num_local_experts)
        need_int("sliding_window", 1, _MAX_CONTEXT)
        need_int("initial_context_length", 1, _MAX_CONTEXT)
        need_int("max_position_embeddings", 1, _MAX_CONTEXT)
        need_float("rms_norm_eps", 0.0, 1.0)
        need_float("swiglu_limit", 0.0, 1e6)
        need_float("rope_theta", 1.0, 1e12)
        need_float("rope_scaling_factor", 1.0, 1e6)
        need_float("rope_beta_fast", 1e-6, 1e6)
        need_float("rope_beta_slow", 1e-6, 1e6)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even, got {self.head_dim}")
        # MXFP4 experts pack 32 values per scale along the input dimension.
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ConfigError(f"{source}: {name} must be a multiple of 32 (MXFP4 groups)")
        lt = self.layer_types
        if not isinstance(lt, list) or len(lt) != self.num_hidden_layers:
            raise ConfigError(
                f"{source}: layer_types must list {self.num_hidden_layers} entries, "
                f"got {len(lt) if isinstance(lt, list) else type(lt).__name__}"
            )
        bad = [t for t in lt if t not in (SLIDING, FULL)]
        if bad:
            raise ConfigError(f"{source}: unknown layer type {bad[0]!r} in layer_types")

    def to_dict(self) -> dict[str, Any]:
        """Hugging Face-style dict (what a converted folder's config.json holds)."""
        d = asdict(self)
        for k in ("rope_scaling_factor", "rope_beta_fast", "rope_beta_slow"):
            d.pop(k)
        d["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": self.rope_scaling_factor,
            "beta_fast": self.rope_beta_fast,
            "beta_slow": self.rope_beta_slow,
            "original_max_position_embeddings": self.initial_context_length,
            "truncate": False,
        }
        return d
