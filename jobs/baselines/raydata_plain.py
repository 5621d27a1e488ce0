"""Plain Ray Data baseline: PyAV decode (1 fps, 224x224 RGB) in flat_map ->
preprocess actor pool (ImageNet normalize, CHW float) -> resnet18 actor pool (CPU).

What a user would write instead of vidpipe, from Ray Data's docs; measured beside ``vidpipe bench`` (README,
Performance).  Run: ``python jobs/baselines/raydata_plain.py FILM.mp4 DURATION_S`` in vidpipe's venv."""
import sys
import time

import numpy as np
import ray

PATH = sys.argv[1] if len(sys.argv) > 1 else "/root/.cache/vidpipe/media/bbb_film.mp4"
DUR = float(sys.argv[2]) if len(sys.argv) > 2 else 596.5
BATCH = 32


def decode(row):
    import av
    with av.open(row["path"]) as c:
        s = c.streams.video[0]
        next_t = 0.0
        for f in c.decode(s):
            if f.pts is None:
                continue
            t = float(f.pts * s.time_base)
            if t >= next_t:
                img = f.to_ndarray(width=224, height=224, format="rgb24")
                yield {"ts": t, "image": img}
                while next_t <= t:
                    next_t += 1.0


class Preprocess:
    def __init__(self):
        self.mean = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)

    def __call__(self, batch):
        x = batch["image"].astype(np.float32) / 255.0          # N,H,W,C
        x = x.transpose(0, 3, 1, 2)                            # N,C,H,W
        x = (x - self.mean) / self.std
        return {"ts": batch["ts"], "tensor": np.ascontiguousarray(x)}


class Model:
    def __init__(self):
        import torch
        import torchvision
        self.torch = torch
        self.m = torchvision.models.resnet18(weights=None).eval()

    def __call__(self, batch):
        torch = self.torch
        with torch.inference_mode():
            out = self.m(torch.from_numpy(batch["tensor"]))
        return {"ts": batch["ts"], "pred": out.argmax(dim=1).numpy()}


def main():
    ray.init()
    t0 = time.perf_counter()
    ds: ray.data.Dataset = ray.data.from_items([{"path": PATH}])
    ds = ds.flat_map(decode)
    ds = ds.map_batches(Preprocess, batch_size=BATCH, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    ds = ds.map_batches(Model, batch_size=BATCH, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    n = 0
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        n += len(b["pred"])
    wall = time.perf_counter() - t0
    print(f"RESULT raydata wall_s={wall:.2f} video_s_per_s={DUR / wall:.2f} frames={n}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
