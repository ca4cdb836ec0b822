"""NVIDIA DALI two-view augmentation pipeline (the `[dali]` extra).

One pipeline produces both SimCLR views and the clean view of a batch. Images arrive as uint8
HWC NumPy batches through `fn.external_source`; so do the per-image augmentation parameters,
which the loader draws with NumPy from a generator seeded by (seed, epoch, global batch) (see
`fastcluster_cl.data.augment`). The pipeline itself draws no random numbers, so its output is a
pure function of the batch's images and parameters: a resumed run is exact, with no need to
checkpoint DALI's RNG state, and the pipeline is built once, not per epoch.

Operators per view: `fn.resize` with the crop box as ROI (the random resized crop),
`fn.color_twist` (brightness, contrast, saturation, hue; grayscale as saturation 0), optional
`fn.gaussian_blur` (a sigma of 1e-6 is an exact identity where blur is off), and
`fn.crop_mirror_normalize` (horizontal flip, mean/std, HWC -> CHW float). Differences from the
torchvision backend, which applies the same parameters: DALI's colour twist applies the four
jitter factors as one fused linear transform in a fixed order (torchvision follows the sampled
order); its hue is a rotation in YIQ space that keeps luma (torchvision shifts HSV hue, so the
two agree in direction, not in pixels); its contrast pivots on mid-grey where torchvision's
pivots on the image's mean grey. Crops, flips, brightness, saturation, grayscale and blur agree
to within 2 of 255 (tests/data/test_data_dali.py).

The digit presets' operations (affine and elastic warp, dilation/erosion, contrast, noise,
erasing) are not DALI operators here: the loader runs `augment.digit_view`, the torchvision
path's own batched torch code, on this pipeline's output with the same parameters, on the same
device (`TrainLoader._dali_batch`). DALI has no per-sample elastic field input, and its noise
operators draw from their own RNG, which would break the (seed, epoch, batch) contract.

`device_id=None` runs every operator on the CPU (what CI tests); `device_id=k` runs them on
CUDA device k and returns CUDA tensors.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from .augment import AugmentSpec, ViewParams

_NO_BLUR_SIGMA = 1e-6  # Gaussian weights off the center underflow to exactly 0


@cache
def dali_unavailable_reason() -> str | None:
    """None when DALI and its PyTorch plugin import, else why not."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as err:  # a broken install raises more than ImportError
        return f"nvidia.dali is not importable ({type(err).__name__}: {err})"
    return None


def _view_inputs(p: ViewParams) -> dict[str, np.ndarray]:
    """One view's parameters as the per-sample arrays its external sources take."""
    top, left = p.top.astype(np.float32), p.left.astype(np.float32)
    return {
        "roi_start": np.stack([top, left], axis=1),
        "roi_end": np.stack([top + p.height, left + p.width], axis=1).astype(np.float32),
        "mirror": p.flip.astype(np.int32),
        "brightness": p.brightness.astype(np.float32),
        "contrast": p.contrast.astype(np.float32),
        "saturation": np.where(p.gray, 0.0, p.saturation).astype(np.float32),
        "hue": (p.hue * 360.0).astype(np.float32),  # fraction of the circle -> degrees
        "sigma": np.where(p.sigma > 0, p.sigma, _NO_BLUR_SIGMA).astype(np.float32),
    }


class DaliTwoViewPipeline:
    """Builds the DALI pipeline once; `run` maps a uint8 batch + parameters to torch tensors.

    Args:
        max_batch_size: largest batch `run` will get. image_size: output side S.
        spec: the AugmentSpec (decides which operators exist: colour, blur).
        mean, std: per-channel statistics of pixels in [0, 1].
        device_id: None for CPU, else the CUDA device index. num_threads: DALI CPU threads.
    """

    def __init__(
        self,
        max_batch_size: int,
        image_size: int,
        spec: AugmentSpec,
        mean,
        std,
        *,
        device_id: int | None = None,
        num_threads: int = 1,
    ):
        reason = dali_unavailable_reason()
        if reason is not None:
            raise ImportError(f"{reason}; install it with pip install fastcluster_cl[dali]")
        self.image_size, self.spec, self.device_id = image_size, spec, device_id
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self._channels = len(mean)
        self._pipe = self._build(max_batch_size, mean, std, num_threads)

    def _view_keys(self) -> list[str]:
        keys = ["roi_start", "roi_end", "mirror"]
        if self.spec.uses_colour:
            keys += ["brightness", "contrast", "saturation", "hue"]
        if self.spec.blur_p > 0:
            keys.append("sigma")
        return keys

    def _build(self, max_batch_size, mean, std, num_threads):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        size = self.image_size
        kernel = self.spec.blur_kernel(size)
        norm = {
            "mean": [255.0 * m for m in mean],
            "std": [255.0 * s for s in std],
            "dtype": types.FLOAT,
            "output_layout": "CHW",
        }
        on_gpu = self.device_id is not None

        # Synchronous execution: `run` feeds a batch and reads its outputs at once.
        @pipeline_def(
            batch_size=max_batch_size,
            num_threads=num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        def two_view():
            images = fn.external_source(name="images", layout="HWC", dtype=types.UINT8)
            if on_gpu:
                images = images.gpu()
            outputs = []
            for v in "ab":
                arg = {key: fn.external_source(name=f"{v}_{key}") for key in self._view_keys()}
                x = fn.resize(
                    images,
                    size=[size, size],
                    roi_start=arg["roi_start"],
                    roi_end=arg["roi_end"],
                    roi_relative=False,
                    antialias=True,
                )
                if self.spec.uses_colour:
                    x = fn.color_twist(
                        x,
                        brightness=arg["brightness"],
                        hue=arg["hue"],
                        contrast=arg["contrast"],
                        saturation=arg["saturation"],
                    )
                if self.spec.blur_p > 0:
                    x = fn.gaussian_blur(x, sigma=arg["sigma"], window_size=kernel)
                outputs.append(fn.crop_mirror_normalize(x, mirror=arg["mirror"], **norm))
            outputs.append(
                fn.crop_mirror_normalize(
                    fn.resize(images, size=[size, size], antialias=True), **norm
                )
            )
            return tuple(outputs)

        pipe = two_view()
        pipe.build()
        return pipe

    def run(self, images: np.ndarray, params_a: ViewParams, params_b: ViewParams):
        """images: uint8 (B, H, W, C). Returns (a, b, clean): float32 (B, C, S, S) on the
        pipeline's device, normalised."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        images = np.ascontiguousarray(images)
        self._pipe.feed_input("images", images, layout="HWC")
        for v, params in (("a", params_a), ("b", params_b)):
            inputs = _view_inputs(params)
            for key in self._view_keys():
                self._pipe.feed_input(f"{v}_{key}", inputs[key])
        shape = (len(images), self._channels, self.image_size, self.image_size)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        results = []
        for out in self._pipe.run():
            tensor = torch.empty(shape, dtype=torch.float32, device=self.device)
            feed_ndarray(out.as_tensor(), tensor, cuda_stream=stream)
            results.append(tensor)
        if stream is not None:  # the next run reuses DALI's output buffers: finish the copies
            stream.synchronize()
        return tuple(results)
