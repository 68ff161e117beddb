"""Real image files as each generator writes them (its documented metadata layout), for the scan, the images
source and evaluate tests.  Small solid-colour pictures: the metadata is the point.

- AUTOMATIC1111 / Forge / SD.Next: a PNG tEXt chunk ``parameters`` ("PROMPT\\nNegative prompt: ...\\nSteps: ..,
  Sampler: .., CFG scale: .., Seed: .., Size: WxH, Model hash: .., Model: ..."); in JPEG and WebP the same
  text as EXIF UserComment, "UNICODE\\0" then UTF-16 big-endian (what A1111 writes through piexif).
- ComfyUI: PNG tEXt ``prompt`` (the API-format graph: node id -> {class_type, inputs}, a link being
  [node id, output slot]) and ``workflow`` (the editor's graph; ``links`` rows are [id, from node, from slot,
  to node, to slot, type]).
- InvokeAI 3+: ``invokeai_metadata`` JSON; legacy: ``sd-metadata`` JSON and ``Dream`` ('"PROMPT [NEG]" -s .. -S ..').
- NovelAI: ``Title``, ``Description`` (the prompt), ``Software``, ``Source`` ("Stable Diffusion HASH"),
  ``Comment`` (JSON: steps, sampler, seed, scale, uc ...).
- Fooocus: ``parameters`` as JSON (prompt, negative_prompt, base_model, base_model_hash, sampler, scheduler,
  seed, steps, guidance_scale, sharpness, version) and ``fooocus_scheme`` = "fooocus".
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 30)}


def picture(colour: str = "red", size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), COLOURS.get(colour, (128, 128, 128)))
    for x in range(size // 4, 3 * size // 4):  # a shape, so that images differ by more than their colour
        for y in range(size // 4, 3 * size // 4):
            image.putpixel((x, y), (255 - image.getpixel((x, y))[0], 128, 64))
    return image


def a1111_text(prompt: str, negative: str = "blurry, lowres", seed: int = 1234, size: int = 64) -> str:
    return (
        f"{prompt}\nNegative prompt: {negative}\n"
        f"Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: {seed}, Size: {size}x{size}, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.9.4"
    )


def write_png(path: Path, texts: dict[str, str], colour: str = "red", size: int = 64) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture(colour, size).save(path, pnginfo=info)
    return path


def user_comment(text: str) -> bytes:
    return b"UNICODE\0" + text.encode("utf-16-be")


def write_exif_image(path: Path, text: str, colour: str = "red", size: int = 64) -> Path:
    """JPEG or WebP (by the suffix) with ``text`` as EXIF UserComment."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = user_comment(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture(colour, size).save(path, exif=exif.tobytes(), quality=90)
    return path


def write_a1111(path: Path, prompt: str, colour: str = "red", seed: int = 1234) -> Path:
    text = a1111_text(prompt, seed=seed)
    if path.suffix == ".png":
        return write_png(path, {"parameters": text}, colour)
    return write_exif_image(path, text, colour)


def _ksampler(seed, steps, cfg, sampler, scheduler, denoise, positive: str, latent: str) -> dict:
    """A KSampler node on checkpoint node 4 and negative encoder node 7; ``positive`` and ``latent``: node ids."""
    settings = dict(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler, denoise=denoise)
    wiring = dict(model=["4", 0], positive=[positive, 0], negative=["7", 0], latent_image=[latent, 0])
    return {"class_type": "KSampler", "inputs": {**settings, **wiring}}


def comfy_two_samplers() -> tuple[dict, dict]:
    """(prompt, workflow) of a two-pass graph: a base KSampler (node 3) on "a red cube on a table", then an
    upscale pass (KSampler node 12) whose positive prompt is another encoder, "highly detailed"."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube on a table", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": _ksampler(42, 20, 8.0, "euler", "normal", 1.0, positive="6", latent="5"),
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "highly detailed", "clip": ["4", 1]}},
        "12": _ksampler(43, 10, 5.0, "dpmpp_2m", "karras", 0.5, positive="11", latent="3"),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
    links = []
    for target, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                kind = {"clip": "CLIP", "model": "MODEL", "vae": "VAE"}.get(name, "CONDITIONING")
                if name in ("latent_image", "samples"):
                    kind = "LATENT"
                links.append([len(links) + 1, int(value[0]), value[1], int(target), 0, kind])
    workflow = {
        "last_node_id": 12,
        "last_link_id": len(links),
        "nodes": [{"id": int(k), "type": v["class_type"]} for k, v in prompt.items()],
        "links": links,
        "version": 0.4,
    }
    return prompt, workflow


def write_comfy(path: Path, with_workflow: bool = True) -> Path:
    prompt, workflow = comfy_two_samplers()
    texts = {"prompt": json.dumps(prompt)}
    if with_workflow:
        texts["workflow"] = json.dumps(workflow)
    return write_png(path, texts, "blue")


def write_invokeai(path: Path) -> Path:
    meta = {
        "generation_mode": "txt2img",
        "positive_prompt": "a green sphere in the fog",
        "negative_prompt": "text, watermark",
        "width": 64,
        "height": 64,
        "seed": 777,
        "rand_device": "cpu",
        "cfg_scale": 7.5,
        "steps": 30,
        "scheduler": "dpmpp_2m",
        "model": {"key": "abc", "hash": "blake3:00", "name": "stable-diffusion-v1-5", "base": "sd-1", "type": "main"},
        "app_version": "4.2.0",
    }
    return write_png(path, {"invokeai_metadata": json.dumps(meta)}, "green")


def write_invokeai_dream(path: Path) -> Path:
    return write_png(path, {"Dream": '"a yellow star [ugly]" -s 50 -S 9 -W 64 -H 64 -C 7.5 -A k_lms'}, "yellow")


def write_novelai(path: Path) -> Path:
    comment = {
        "prompt": "1girl, red dress, masterpiece",
        "steps": 28,
        "height": 64,
        "width": 64,
        "scale": 11.0,
        "uncond_scale": 1.0,
        "cfg_rescale": 0.0,
        "seed": 3141,
        "n_samples": 1,
        "noise_schedule": "native",
        "sampler": "k_euler_ancestral",
        "strength": 0.7,
        "noise": 0.2,
        "uc": "lowres, bad anatomy",
    }
    texts = {
        "Title": "AI generated image",
        "Description": "1girl, red dress, masterpiece",
        "Software": "NovelAI",
        "Source": "Stable Diffusion 1D44365E",
        "Comment": json.dumps(comment),
    }
    return write_png(path, texts, "red")


def write_fooocus(path: Path) -> Path:
    params = {
        "prompt": "a cozy cabin in the snow",
        "negative_prompt": "unrealistic",
        "styles": "['Fooocus V2']",
        "performance": "Speed",
        "resolution": "(64, 64)",
        "guidance_scale": 4.0,
        "sharpness": 2.0,
        "adm_guidance": "(1.5, 0.8, 0.3)",
        "base_model": "juggernautXL_v8Rundiffusion.safetensors",
        "base_model_hash": "aeb7e9e689",
        "refiner_model": "None",
        "sampler": "dpmpp_2m_sde_gpu",
        "scheduler": "karras",
        "seed": 1605,
        "steps": 30,
        "version": "Fooocus v2.5.5",
    }
    return write_png(path, {"parameters": json.dumps(params), "fooocus_scheme": "fooocus"}, "blue")


def write_plain(path: Path, colour: str = "green") -> Path:
    """No metadata at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture(colour).save(path)
    return path


SHAPES = ["cube", "sphere", "pyramid", "cone", "torus", "cylinder"]


def make_folder(root: Path, name: str, n: int = 6) -> list[str]:
    """``n`` A1111 PNGs with distinct prompts in ``root/name``, and one image without metadata (skipped)."""
    colours = list(COLOURS)
    prompts = []
    for i in range(n):
        prompt = f"{name} a {colours[i % 4]} {SHAPES[i % 6]} on a table, photo number {i}"
        write_a1111(root / name / f"{i:05d}.png", prompt, colour=colours[i % 4], seed=i)
        prompts.append(prompt)
    write_plain(root / name / "no-metadata.png")
    return prompts
