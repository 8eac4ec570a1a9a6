"""What a compression did, in numbers a user can print: tokens kept per layer and modality, KV bytes saved."""

from __future__ import annotations

from dataclasses import dataclass, field

MODALITIES = ("text", "image", "video", "generated")


@dataclass
class LayerStats:
    layer: int
    seen: int  # logical tokens (prompt + generated) per row
    slots: int  # physical entries per row and head (padding included)
    kept: dict[str, float]  # real tokens kept, summed over the batch, averaged over KV heads, per modality
    nbytes: int

    @property
    def total(self) -> float:
        return sum(self.kept.values())


@dataclass
class CompressionStats:
    """Snapshot of a cache: after the prefill compression (`prefill`) or at the end of `generate` (`final`)."""

    policy: str
    batch: int
    prompt: dict[str, int]  # real prompt tokens per modality, summed over the batch
    layers: list[LayerStats] = field(default_factory=list)
    kv_bytes: int = 0  # held now, every layer (sliding-window layers included)
    kv_bytes_full: int = 0  # what an uncompressed cache would hold for the same tokens
    # the cache's high-water mark: the most it held during a prompt's forward (each layer holds its whole prompt until
    # it is cut; VL-Cache without cascading holds every layer whole until the last one) or now, whichever is more.
    # Sampled in each prefill layer only (not during lookahead's waiting steps or a chat's later turns)
    kv_bytes_peak: int = 0
    merged: dict[str, int] = field(default_factory=dict)  # vision tokens temporal merging dropped before the model
    bits: dict[str, int] = field(default_factory=dict)  # KV quantization: bits per modality ({} when not quantized)
    # quantized layers' bytes by kind: "codes" (packed), "scales" (scales, zero points, group indices), "full"
    # (16-bit entries and the full-precision window); part of kv_bytes
    kv_bytes_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt.values())

    @property
    def kv_bytes_saved(self) -> int:
        return self.kv_bytes_full - self.kv_bytes

    @property
    def kv_ratio(self) -> float:
        """Bytes held / bytes an uncompressed cache would hold (1.0 = nothing saved)."""
        return self.kv_bytes / self.kv_bytes_full if self.kv_bytes_full else 1.0

    def kept(self, modality: str | None = None) -> float:
        """Tokens kept, averaged over layers (one modality, or all)."""
        if not self.layers:
            return 0.0
        if modality is None:
            return sum(s.total for s in self.layers) / len(self.layers)
        return sum(s.kept[modality] for s in self.layers) / len(self.layers)

    def summary(self) -> str:
        seen = self.layers[0].seen * self.batch if self.layers else 0
        parts = [f"{m} {self.kept(m):.0f}/{self.prompt[m]}" for m in ("text", "image", "video") if self.prompt.get(m)]
        merged = (
            "; merged before the model: " + ", ".join(f"{m} {k}" for m, k in self.merged.items()) if self.merged else ""
        )
        quant = ""
        if self.bits:
            widths = ", ".join(f"{m} {b}-bit" for m, b in self.bits.items())
            quant = f"; quantized {widths} (scales {_mib(self.kv_bytes_by_kind.get('scales', 0))})"
        return (
            f"{self.policy}: kept {self.kept():.0f} of {seen} tokens per layer ({', '.join(parts) or 'no prompt tokens'}); "
            f"KV {_mib(self.kv_bytes)} of {_mib(self.kv_bytes_full)} ({100 * (1 - self.kv_ratio):.1f}% saved){merged}{quant}"
        )

    def table(self) -> str:
        rows = [f"{'layer':>5} {'seen':>7} {'slots':>7} " + " ".join(f"{m:>9}" for m in MODALITIES) + f" {'KV':>10}"]
        for s in self.layers:
            rows.append(
                f"{s.layer:>5} {s.seen:>7} {s.slots:>7} "
                + " ".join(f"{s.kept[m]:>9.1f}" for m in MODALITIES)
                + f" {_mib(s.nbytes):>10}"
            )
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "prompt_tokens": self.prompt_tokens,
            "kept_tokens": round(self.kept(), 2),
            "kept_by_modality": {m: round(self.kept(m), 2) for m in MODALITIES},
            "kv_bytes": self.kv_bytes,
            "kv_bytes_full": self.kv_bytes_full,
            "kv_bytes_peak": self.kv_bytes_peak,
            "kv_bytes_saved": self.kv_bytes_saved,
            "merged": dict(self.merged),
            "bits": dict(self.bits),
            "kv_bytes_by_kind": dict(self.kv_bytes_by_kind),
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"
