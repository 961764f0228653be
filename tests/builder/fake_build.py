"""`lookalike-build` with a fake trunk, for tests of the builder's cache and resume logic.

Everything is the real CLI (Spark scan and filter, the feature cache, embedding in Spark executors from the
exported trunk SavedModel, the head, Annoy, publish) except the backbone: a tiny pixel-pooling network takes
its place, so a build costs Spark and not a real model. `run(images, out, **options)` builds in this
process (one Spark JVM for every such build of a test session); as a process of its own,
`python -m tests.builder.fake_build [--block-after-shards N MARKER] <lookalike-build arguments>`, and
with `--block-after-shards`, the build writes MARKER once it has published N embedding shards and then waits
to be killed: a test can interrupt it at a known point, never too late.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

# 8 x 8 cells of 32 x 32 pixels, 3 channels: distinct enough to index the sample, cheap to run.
FAKE_WIDTH = 192
_BLOCK_S = 600  # bounded: a blocked build that nobody kills still ends


def fake_trunk(backbone: str, head: str, weights_file: str | None = None, pooling: str = "avg",
               mirror: bool = False):
    """The trunk's interface (uint8 pixels -> un-normalised features) with no backbone behind it."""
    import keras

    from lookalike.preprocess import INPUT_SIZE
    from lookalike.runner import INPUT_NAME

    pixels = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), dtype="uint8", name=INPUT_NAME)
    x = keras.layers.Rescaling(1 / 255, name="to_float")(pixels)
    x = keras.layers.AveragePooling2D(INPUT_SIZE // 8, name="cells")(x)
    x = keras.layers.Flatten(name="features")(x)
    return keras.Model(pixels, x, name=f"fake_{head}_{pooling}_trunk")


def _blocking_publish(real_publish, shards: int, marker: Path):
    published: list[Path] = []

    def publish(tmp: Path, final: Path) -> bool:
        done = real_publish(tmp, final)
        if Path(final).parent.name == "shards":
            published.append(Path(final))
            if len(published) == shards:
                marker.write_text("\n".join(str(p) for p in published))
                time.sleep(_BLOCK_S)
        return done

    return publish


@contextlib.contextmanager
def fake_model():
    """builder.build with the fake trunk in place of the backbone, for the duration of the block."""
    import builder.build as build

    real = build.build_trunk
    build.build_trunk = fake_trunk
    try:
        yield
    finally:
        build.build_trunk = real


def run(images: Path, out: Path, **options) -> dict:
    """A build in this process with the fake trunk; returns its manifest. Options are BuildConfig's fields."""
    from builder.build import BuildConfig, run_build

    with fake_model():
        return run_build(BuildConfig(images=Path(images), out=Path(out), **options)).manifest


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    import builder.build as build

    build.build_trunk = fake_trunk
    if args[:1] == ["--block-after-shards"]:
        build.publish = _blocking_publish(build.publish, int(args[1]), Path(args[2]))
        args = args[3:]
    from builder.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
