"""Models: the four tiny backbones end to end, the three head wirings, the joint loss, the registry."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models import (
    BACKBONES,
    HEAD_MODES,
    ReverseSDHeads,
    ReverseSDLoss,
    create_model,
    multi_hot,
)
from pipeline.models import backbones as bb
from pipeline.training.optim import trainable_parameters

K = 50
B = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pixels(model, batch: int = B, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, model.image_size, model.image_size, generator=g)


@pytest.fixture(scope="module", params=["vit", "swin", "clip", "unet"])
def tiny(request):
    torch.manual_seed(0)
    return create_model(request.param, variant="tiny", vocab_size=K)


def test_registry_lists_the_four_backbones():
    assert BACKBONES.names() == ["clip", "swin", "unet", "vit"]
    assert set(BACKBONES) == set(BACKBONES.names()) and len(BACKBONES) == 4


def test_tiny_forward_shapes_unit_norm_and_attributes(tiny):
    tiny.eval()
    with torch.no_grad():
        embedding, logits = tiny(_pixels(tiny))
    assert embedding.shape == (B, 384) and logits.shape == (B, K)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert torch.isfinite(logits).all()
    assert tiny.image_size == 64 and tiny.embed_dim == 384 and tiny.vocab_size == K
    assert len(tiny.mean) == 3 and len(tiny.std) == 3 and all(s > 0 for s in tiny.std)
    assert tiny.uses_context == (tiny.backbone_name == "unet")
    assert tiny.head_mode == "emb_to_cls"


def test_backward_reaches_every_trainable_parameter_and_no_frozen_one(tiny):
    tiny.train()
    tiny.zero_grad(set_to_none=True)
    embedding, logits = tiny(_pixels(tiny, seed=1))
    target = F.normalize(torch.randn(B, 384), dim=-1)
    labels = (torch.rand(B, K) > 0.8).float()
    loss, _ = ReverseSDLoss(0.1)(embedding, target, logits, labels)
    loss.backward()
    trainable = trainable_parameters(tiny)
    assert trainable
    missing = [n for n, p in tiny.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing[:5]}"  # DDP needs every trainable parameter used
    assert all(torch.isfinite(p.grad).all() for p in trainable)
    in_backbone = [p for n, p in tiny.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    assert (tiny.backbone_name == "clip") == (not in_backbone)  # only the CLIP tower is entirely frozen
    assert all(p.grad.abs().sum() > 0 for p in in_backbone[:1])
    assert all(p.grad is None for p in tiny.parameters() if not p.requires_grad)
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name,frozen", [("clip", "tower"), ("unet", "vae")])
def test_frozen_parts_stay_frozen_through_an_optimizer_step(name, frozen):
    torch.manual_seed(0)
    model = create_model(name, vocab_size=K)
    part = getattr(model.backbone, frozen)
    assert all(not p.requires_grad for p in part.parameters())
    model.train()
    assert model.training and not part.training  # eval mode kept even under train()
    before = {k: v.clone() for k, v in part.state_dict().items()}
    head_before = [p.detach().clone() for p in model.heads.parameters()]
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    embedding, logits = model(_pixels(model))
    loss, _ = ReverseSDLoss(0.1)(embedding, F.normalize(torch.randn(B, 384), dim=-1), logits, torch.ones(B, K))
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in part.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.heads.parameters()))
    n_frozen = sum(p.numel() for p in part.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in trainable_parameters(model)) == n_all - n_frozen


def test_unet_context_none_tensor_and_bad_shape():
    torch.manual_seed(0)
    model = create_model("unet", vocab_size=K).eval()
    assert model.uses_context and model.context_dim == 32
    pixels = _pixels(model)
    with torch.no_grad():
        e_none, _ = model(pixels)
        e_ctx, _ = model(pixels, context=torch.randn(B, 7, 32) * 3)
        e_flat, _ = model(pixels, context=torch.randn(B, 32) * 3)
        e_null, _ = model(pixels, context=model.backbone.null_context.expand(B, 1, 32))
    assert e_ctx.shape == e_flat.shape == (B, 384)
    assert not torch.allclose(e_none, e_ctx, atol=1e-4)  # the caption reaches the cross-attention
    assert torch.allclose(e_none, e_null, atol=1e-5)  # no caption = the learned null context
    with pytest.raises(ValueError, match="context"):
        model(pixels, context=torch.randn(B, 7, 31))
    model.train()
    embedding, logits = model(pixels, context=torch.randn(B, 7, 32))
    (embedding.sum() + logits.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # the unused null context stays in the graph (DDP requires it)


def test_context_is_ignored_by_image_only_backbones():
    torch.manual_seed(0)
    model = create_model("vit", vocab_size=K).eval()
    pixels = _pixels(model)
    with torch.no_grad():
        assert torch.equal(model(pixels)[0], model(pixels, context=torch.randn(B, 4, 16))[0])


@pytest.mark.parametrize("head_mode", HEAD_MODES)
@pytest.mark.parametrize("vocab_size", [0, K])
def test_config_dict_round_trips_through_create_model(tiny, head_mode, vocab_size):
    torch.manual_seed(1)
    model = create_model(tiny.backbone_name, vocab_size=vocab_size, head_mode=head_mode, embed_dim=384).eval()
    config = json.loads(json.dumps(model.config_dict()))
    assert config["backbone"] == tiny.backbone_name and config["pretrained"] is False
    torch.manual_seed(2)  # a different random init: only load_state_dict can make them agree
    rebuilt = create_model(**config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    pixels = _pixels(model)
    with torch.no_grad():
        (e1, l1), (e2, l2) = model(pixels), rebuilt(pixels)
    assert torch.allclose(e1, e2, atol=1e-6)
    assert (l1 is None) == (l2 is None) == (vocab_size == 0)
    if l1 is not None:
        assert torch.allclose(l1, l2, atol=1e-6)


def _depends(output: torch.Tensor, params) -> bool:
    grads = torch.autograd.grad(output.sum(), list(params), allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("head_mode", HEAD_MODES)
def test_head_wiring(head_mode):
    torch.manual_seed(0)
    heads = ReverseSDHeads(feature_dim=16, embed_dim=8, vocab_size=5, head_mode=head_mode, hidden=(12,))
    features = torch.randn(4, 16)
    embedding, logits = heads(features)
    assert embedding.shape == (4, 8) and logits.shape == (4, 5)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(4), atol=1e-6)
    emb_params, cls_params = heads.embedding.parameters(), heads.vocabulary.parameters()
    embedding, logits = heads(features)
    # emb_to_cls: the classifier reads the embedding; cls_to_emb: the embedding head reads the classifier.
    assert _depends(logits, emb_params) == (head_mode == "emb_to_cls")
    embedding, logits = heads(features)
    assert _depends(embedding, cls_params) == (head_mode == "cls_to_emb")
    if head_mode == "cls_to_emb":  # the classifier's sigmoid probabilities are what the embedding head sees
        lin = heads.embedding.net[0]
        manual = lin(torch.cat([features, torch.sigmoid(heads.vocabulary(features))], dim=-1))
        manual = F.normalize(heads.embedding.net[2](heads.embedding.net[1](manual)), dim=-1)
        assert torch.allclose(manual, heads(features)[0], atol=1e-6)
    if head_mode == "emb_to_cls":
        manual = heads.vocabulary(torch.cat([features, heads.embedding(features)], dim=-1))
        assert torch.allclose(manual, heads(features)[1], atol=1e-6)


@pytest.mark.parametrize("head_mode", HEAD_MODES)
def test_vocab_size_zero_has_no_vocabulary_head(head_mode):
    model = create_model("vit", vocab_size=0, head_mode=head_mode)
    assert model.heads.vocabulary is None
    embedding, logits = model(_pixels(model))
    assert logits is None and embedding.shape == (B, 384)


def test_clip_mlp_head_sizes_follow_the_spec():
    model = create_model("clip", vocab_size=0)
    linears = [m for m in model.heads.embedding.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 128), (128, 128), (128, 384)]
    assert BACKBONES.get("clip").head_hidden["full"] == (8192, 8192)


def test_loss_matches_a_hand_computation():
    pred = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    target = torch.tensor([[0.0, 2.0, 0.0], [3.0, 4.0, 0.0]])
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cos_loss = ((1 - 0.0) + (1 - (0.6 * 3 + 0.8 * 4) / 5.0)) / 2  # cosines 0 and 1

    def bce(x, y):
        s = 1 / (1 + math.exp(-x))
        return -(y * math.log(s) + (1 - y) * math.log(1 - s))

    bce_loss = np.mean([bce(x, y) for x, y in zip(logits.flatten().tolist(), labels.flatten().tolist())])
    total, parts = ReverseSDLoss(0.25)(pred, target, logits, labels)
    assert total.item() == pytest.approx(cos_loss + 0.25 * bce_loss, abs=1e-6)
    assert parts["cosine"].item() == pytest.approx(cos_loss, abs=1e-6)
    assert parts["bce"].item() == pytest.approx(bce_loss, abs=1e-6)
    assert total.requires_grad is False  # plain tensors in, nothing to differentiate
    zero, zero_parts = ReverseSDLoss(0.0)(pred, target, logits, labels)
    assert zero.item() == pytest.approx(cos_loss, abs=1e-6)
    assert zero_parts["bce"].item() == pytest.approx(bce_loss, abs=1e-6)  # reported, not added
    none, none_parts = ReverseSDLoss(0.25)(pred, target)
    assert none.item() == pytest.approx(cos_loss, abs=1e-6) and none_parts["bce"].item() == 0.0
    with pytest.raises(ValueError):
        ReverseSDLoss(0.1)(pred, target, logits, labels[:, :1])
    with pytest.raises(ValueError):
        ReverseSDLoss(-1.0)


def test_lambda_zero_gives_the_cosine_gradient_only():
    torch.manual_seed(0)
    pred = torch.randn(4, 6, requires_grad=True)
    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(4, 6)
    total, _ = ReverseSDLoss(0.0)(pred, target, logits, torch.ones(4, 3))
    total.backward()
    expected = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    assert torch.allclose(total, expected)
    assert logits.grad is None


def test_multi_hot():
    out = multi_hot([[0, 2], [], [4, 4, 1]], 5)
    assert out.dtype == torch.float32
    assert out.tolist() == [[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]]
    assert multi_hot([], 3).shape == (0, 3)
    with pytest.raises(ValueError):
        multi_hot([[5]], 5)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"backbone": "resnet"}, "clip, swin, unet, vit"),
        ({"backbone": "vit", "variant": "huge"}, "tiny, full"),
        ({"backbone": "vit", "head_mode": "both"}, "independent, cls_to_emb, emb_to_cls"),
        ({"backbone": "vit", "pretrained": True}, "full"),
        ({"backbone": "vit", "vocab_size": -1}, "vocab_size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_valid_ones(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        create_model(**kwargs)


def test_full_vit_is_the_timm_class_at_224():
    from timm.models.vision_transformer import VisionTransformer

    model = create_model("vit", variant="full", vocab_size=K)
    assert isinstance(model.backbone.model, VisionTransformer)
    assert type(model.backbone.model) is type(create_model("vit").backbone.model)
    assert model.image_size == 224 and model.backbone.feature_dim == 768
    assert sum(p.numel() for p in model.backbone.parameters()) == pytest.approx(85.8e6, rel=0.01)


@pytest.mark.parametrize(
    "name,size,feature_dim,backbone_params",
    [
        ("swin", 256, 1536, 195.2e6),
        ("clip", 224, 1024, 632.1e6),  # ViT-H/14 tower + projection, frozen; the MLP trains
        ("unet", 512, 1280, 385.8e6),  # U-Net encoder + mid block and the VAE encoder, decoders dropped
    ],
)
def test_full_architectures_on_the_meta_device(name, size, feature_dim, backbone_params):
    """The real configs, built without allocating memory: sizes, features, class path, checkpointing."""
    with torch.device("meta"):
        model = create_model(name, variant="full", vocab_size=K)
        tiny = create_model(name, vocab_size=K)
        embedding, logits = model(torch.empty(2, 3, size, size))
    assert embedding.shape == (2, 384) and logits.shape == (2, K)
    assert model.image_size == size and model.backbone.feature_dim == feature_dim
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    assert n_backbone == pytest.approx(backbone_params, rel=0.02)
    if name == "clip":  # the tower is frozen: exactly the heads train
        n_train = sum(p.numel() for p in trainable_parameters(model))
        assert n_train == sum(p.numel() for p in model.heads.parameters())
        mlp = 1024 * 8192 + 8192 + 8192 * 8192 + 8192 + 8192 * 384 + 384
        assert n_train == mlp + (1024 + 384) * K + K
    inner = {"swin": "model", "clip": "tower", "unet": "unet"}[name]
    assert type(getattr(model.backbone, inner)) is type(getattr(tiny.backbone, inner))
    if name == "swin":
        assert all(stage.grad_checkpointing for stage in model.backbone.model.layers)
    if name == "unet":
        assert model.backbone.unet.is_gradient_checkpointing and len(model.backbone.unet.up_blocks) == 0
        assert model.backbone.context_dim == 1024


def test_clip_hub_loader_reads_a_local_clip_checkpoint(tmp_path):
    """The hub code path on its offline twin: a full CLIPModel directory, like the laion repository."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = dict(bb.CLIP_TINY_CONFIG)
    projection = vision.pop("projection_dim")
    text = dict(bb.TINY_TRANSFORMER, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection))
    clip.save_pretrained(tmp_path)
    backbone = bb.ClipBackbone(bb.load_clip_tower(str(tmp_path)))
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        assert backbone(pixels).shape == (2, 64)
        assert torch.allclose(backbone(pixels), expected, atol=1e-5)
    assert not any(p.requires_grad for p in backbone.tower.parameters())


def test_sd_hub_loader_reads_a_local_pipeline_directory(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**bb.TINY_UNET_CONFIG), AutoencoderKL(**bb.TINY_VAE_CONFIG)
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    loaded_unet, loaded_vae = bb.load_sd_unet(str(tmp_path))
    backbone = bb.UNetBackbone(loaded_unet, loaded_vae, 64, checkpointing=False)
    reference = bb.UNetBackbone(unet, vae, 64, checkpointing=False)
    assert backbone.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        if key != "null_context":
            assert torch.equal(value, backbone.state_dict()[key]), key


def test_timm_loader_reads_a_local_weights_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = bb.load_timm("vit_tiny_patch16_224", True, str(tmp_path / "w.safetensors"))
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
