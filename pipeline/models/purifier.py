"""CARSO's purifier: a conditional VAE conditioned on the classifier's internal representation (appendix E).

    input x (clean or perturbed, standardised) -> InputEncoder (Table 4) ----------------------------\\
    activations (one tensor per hooked layer) -> LayerEncoder each (Table 6 or 7)        |
        -> concat -> ReprEncoder (Table 8) -> c (fc_repr) -------------------------------+-> JointEncoder (Table 9)
                                                                                          |     -> (mu, logvar) of z
    z (f_joint) ~ q(z|x,c) in training, N(0, I) at inference; concat(z, c) -> Decoder (Table 10 / 11) -> x_hat

Choices where the paper is silent or inconsistent (documented in docs/faithfulness.md):

- Table 9's second head is read as the log-variance (std = exp(logvar / 2)), the usual stable
  parameterisation of "a standard deviation".
- Table 7 prints a fifth convolution that repeats the fourth's channels (ceil(ci/8) -> ceil(ci/16)) and
  cannot chain; the text says the scenario (c) encoders are four-layered: four convolutions.
- Table 4's ch_in=3 becomes the dataset's channel count (1 for Fashion-MNIST).
- Decoder spatial rule: 32x32 is Table 10 exactly (3x3 start, output_padding 0, final 2x2 kernel),
  64x64 is Table 11 exactly (4x4 start, output_padding 1, final 3x3 kernel). Any other size S (28 for
  Fashion-MNIST) halves S four times rounding up (28 -> 14 -> 7 -> 4 -> 2), starts from the last value,
  and picks each transposed convolution's output_padding to land on the previous value, then a final
  3x3 stride-1 padding-1 transposed convolution: 2 -> 4 -> 7 -> 14 -> 28.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

SLOPE = 0.2


def _conv_bn(cin: int, cout: int, k: int, s: int, p: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False), nn.BatchNorm2d(cout, affine=True),
            nn.LeakyReLU(SLOPE)]


class InputEncoder(nn.Sequential):
    """Table 4: two stride-2 3x3 convolutions, 6 then 12 channels."""

    def __init__(self, in_channels: int):
        super().__init__(*_conv_bn(in_channels, 6, 3, 2, 1), *_conv_bn(6, 12, 3, 2, 1))


class LayerEncoder(nn.Sequential):
    """Tables 6/7: 3x3 valid convolutions halving the channels (rounding up) each time."""

    def __init__(self, ci: int, n_convs: int):
        chans = [ci] + [math.ceil(ci / 2 ** (i + 1)) for i in range(n_convs)]
        super().__init__(*[m for a, b in zip(chans, chans[1:]) for m in _conv_bn(a, b, 3, 1, 0)])


def decoder_plan(size: int) -> dict:
    """Start size, output paddings and final kernel of the decoder for an output of ``size`` pixels."""
    if size == 32:
        return {"start": 3, "output_padding": [0, 0, 0, 0], "final_kernel": 2}
    if size == 64:
        return {"start": 4, "output_padding": [1, 1, 1, 1], "final_kernel": 3}
    sizes = [size]
    for _ in range(4):
        sizes.append(-(-sizes[-1] // 2))
    sizes = sizes[::-1]  # e.g. [2, 4, 7, 14, 28]
    ops = [b - (2 * a - 1) for a, b in zip(sizes, sizes[1:])]
    if any(op not in (0, 1) for op in ops):
        raise ValueError(f"no decoder plan for {size}x{size} images")
    return {"start": sizes[0], "output_padding": ops, "final_kernel": 3}


class Decoder(nn.Module):
    """Tables 10/11: Linear -> 256 x s x s -> four stride-2 transposed convolutions -> sigmoid image."""

    def __init__(self, in_features: int, out_channels: int, size: int):
        super().__init__()
        plan = decoder_plan(size)
        s = plan["start"]
        self.fc = nn.Sequential(nn.Linear(in_features, 256 * s * s, bias=True), nn.LeakyReLU(SLOPE),
                                nn.Unflatten(1, (256, s, s)))
        chans = [256, 256, 128, 64, 32]
        layers: list[nn.Module] = []
        for a, b, op in zip(chans, chans[1:], plan["output_padding"]):
            layers += [nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=op, bias=False),
                       nn.BatchNorm2d(b, affine=True), nn.LeakyReLU(SLOPE)]
        k = plan["final_kernel"]
        layers += [nn.ConvTranspose2d(32, out_channels, k, stride=1, padding=1, bias=True), nn.Sigmoid()]
        self.deconv = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(h))


class Purifier(nn.Module):
    """The conditional VAE. ``layer_shapes`` maps each conditioning layer to its (C, H, W)."""

    def __init__(self, *, image_shape: tuple[int, int, int], layer_shapes: dict[str, tuple[int, int, int]],
                 fc_repr: int, f_joint: int, encoder_convs: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        c, h, w = image_shape
        if h != w:
            raise ValueError(f"square images only, got {h}x{w}")
        self.layer_names = list(layer_shapes)
        self.f_joint = f_joint
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(c, 1, 1))
        self.input_encoder = InputEncoder(c)
        self.layer_encoders = nn.ModuleList([LayerEncoder(s[0], encoder_convs) for s in layer_shapes.values()])
        with torch.no_grad():  # probe with a batch of 2: BatchNorm in training mode rejects a single 1x1 value
            n_in = self.input_encoder(torch.zeros(2, c, h, w))[0].numel()
            n_repr = sum(enc(torch.zeros(2, *s))[0].numel() for enc, s in zip(self.layer_encoders, layer_shapes.values()))
        self.repr_encoder = nn.Sequential(nn.Linear(n_repr, fc_repr, bias=False), nn.BatchNorm1d(fc_repr),
                                          nn.LeakyReLU(SLOPE))
        self.joint_encoder = nn.Sequential(nn.Linear(n_in + fc_repr, f_joint, bias=False), nn.BatchNorm1d(f_joint),
                                           nn.LeakyReLU(SLOPE))
        self.mu = nn.Linear(f_joint, f_joint, bias=True)
        self.logvar = nn.Linear(f_joint, f_joint, bias=True)
        self.decoder = Decoder(f_joint + fc_repr, c, h)
        self.repr_features = n_repr

    def encode_condition(self, acts: list[torch.Tensor]) -> torch.Tensor:
        feats = [enc(a.float()).flatten(1) for enc, a in zip(self.layer_encoders, acts)]
        return self.repr_encoder(torch.cat(feats, dim=1))

    def encode(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hx = self.input_encoder((x - self.mean) / self.std).flatten(1)
        h = self.joint_encoder(torch.cat([hx, cond], dim=1))
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, cond], dim=1))

    def forward(self, x: torch.Tensor, acts: list[torch.Tensor]):
        """Training pass: reparameterised z ~ N(mu, sigma). Returns (x_hat, mu, logvar)."""
        cond = self.encode_condition(acts)
        mu, logvar = self.encode(x, cond)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z, cond), mu, logvar

    def sample(self, acts: list[torch.Tensor], n: int = 1) -> torch.Tensor:
        """Inference: ``n`` reconstructions per input from z ~ N(0, I) (the input encoder is unused).
        Returns (n * B, C, H, W), sample-major (all inputs' first sample, then the second, ...)."""
        cond = self.encode_condition(acts).repeat(n, 1)
        z = torch.randn(cond.shape[0], self.f_joint, device=cond.device, dtype=cond.dtype)
        return self.decode(z, cond)


@dataclass(frozen=True, kw_only=True)
class PurifierSpec:
    """Everything that fixes a purifier's architecture: image shape, conditioning layers and their (C, H, W), the
    sizes of Table 13, the layerwise encoders' depth, and the input standardisation. Stored as ``purifier.json``
    and as the purifier manifest's ``model`` record (``to_json`` / ``from_json``); ``build()`` makes the model."""
    image_shape: tuple[int, int, int]
    layer_shapes: tuple[tuple[str, tuple[int, int, int]], ...]   # in conditioning order
    fc_repr: int
    f_joint: int
    encoder_convs: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def layers(self) -> list[str]:
        return [name for name, _ in self.layer_shapes]

    def build(self) -> "Purifier":
        return Purifier(image_shape=self.image_shape, layer_shapes=dict(self.layer_shapes), fc_repr=self.fc_repr,
                        f_joint=self.f_joint, encoder_convs=self.encoder_convs, mean=self.mean, std=self.std)

    def to_json(self) -> dict:
        return {"image_shape": list(self.image_shape), "layer_shapes": {k: list(v) for k, v in self.layer_shapes},
                "layers": self.layers, "fc_repr": self.fc_repr, "f_joint": self.f_joint,
                "encoder_convs": self.encoder_convs, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def for_config(cls, cfg, shapes: dict, layers) -> "PurifierSpec":
        """The purifier ``cfg`` asks for (``purifier.fc_repr``, ``f_joint``, ``encoder_convs``; the dataset's image
        shape and standardisation), conditioned on ``layers`` of shapes ``shapes`` (``pipeline.sizing.layer_shapes``
        of the classifier)."""
        from ..data import info

        meta, p = info(cfg.data.dataset), cfg.purifier
        return cls(image_shape=(meta.channels, meta.size, meta.size),
                   layer_shapes=tuple((k, tuple(shapes[k])) for k in layers), fc_repr=p.fc_repr, f_joint=p.f_joint,
                   encoder_convs=p.encoder_convs, mean=tuple(meta.mean), std=tuple(meta.std))

    @classmethod
    def from_json(cls, m: dict) -> "PurifierSpec":
        shapes = m["layer_shapes"]
        order = m.get("layers", list(shapes))
        return cls(image_shape=tuple(m["image_shape"]), layer_shapes=tuple((k, tuple(shapes[k])) for k in order),
                   fc_repr=m["fc_repr"], f_joint=m["f_joint"], encoder_convs=m["encoder_convs"], mean=tuple(m["mean"]),
                   std=tuple(m["std"]))


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B, D) KL(q(z_d|x,c) || N(0, 1)) of every latent dimension of every example, in nats."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def vae_loss(x_hat: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float,
             per_dim: bool = False):
    """Summed pixel-wise, channel-wise binary cross-entropy plus beta * KL(q(z|x,c) || N(0, I)), both summed
    over an example's elements and averaged over the batch. Returns (loss, reconstruction, kl), and with
    ``per_dim`` also the (D,) KL of each latent dimension averaged over the batch."""
    n = target.shape[0]
    reco = nn.functional.binary_cross_entropy(x_hat, target, reduction="sum") / n
    dims = kl_per_dim(mu, logvar).mean(0)
    kl = dims.sum()
    loss = reco + beta * kl
    return (loss, reco, kl, dims) if per_dim else (loss, reco, kl)
