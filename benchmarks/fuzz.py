"""Fuzzing the gRPC surface: malformed messages and payloads sent to a live server.

    python -m benchmarks.fuzz [--count 10000] [--model-dir DIR ...] [--seed 0] [--no-write]

Property-based (hypothesis): each example is one call with what a careless or hostile client
could send: random bytes as the serialized request (sent through a generic channel with
identity serializers), mutated valid requests, invalid UTF-8 in string fields, raw pixels of
wrong, zero, negative or huge shapes, unknown dtypes and enum values, NaN and infinities,
truncated PNG/JPEG files, headers that lie about the size, decompression bombs (a small file
declaring a huge image), other image formats, oversize messages, too many images, unknown model
names, fields thousands of entries long (quoted in error messages), unknown methods, health and
reflection fed garbage, and streams that mix good and bad requests. Every call must end with a
defined status (OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED: never
INTERNAL or UNKNOWN), with the status the case calls for where it calls for one, valid answers
where it is OK, request ids echoed; the server must stay up, and a fixed set of probe images
gets the same verdicts after the run as before it.

The benchmark runs a real ``gradprobe serve`` process (the built-in model, plus any
``--model-dir``) and writes the "fuzz" section of RELIABILITY.md;
tests/service/test_fuzz.py runs a few hundred of the same cases against an in-process server.
"""

from __future__ import annotations

import argparse
import io
import math
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import grpc
import numpy as np
from hypothesis import strategies as st

from benchmarks.probes import Model, pixels, probe_verdicts
from service._proto.gradprobe.v1 import reliability_pb2 as pb

PREFIX = "/gradprobe.v1.Reliability/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
# A status the server may answer with; anything else (INTERNAL, UNKNOWN, UNAVAILABLE: the
# server is gone, DEADLINE_EXCEEDED: it hangs) is a finding.
DEFINED = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED"})
NEVER = frozenset({"INTERNAL", "UNKNOWN"})
INVALID = frozenset({"INVALID_ARGUMENT"})
OK = frozenset({"OK"})
OK_OR_INVALID = frozenset({"OK", "INVALID_ARGUMENT"})
# Pillow saves all of these; the server takes only PNG and JPEG.
OTHER_FORMATS = ("GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO", "PCX", "JPEG2000", "SGI")
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Served:
    """What the cases need to know of the server."""

    models: tuple[Model, ...]
    max_message_bytes: int
    max_images: int

    def model(self, name: str) -> Model | None:
        if not name and len(self.models) == 1:
            return self.models[0]
        return next((m for m in self.models if m.name == name), None)


@dataclass(frozen=True)
class Case:
    """One call. ``expect``: the statuses the call may end with; for a stream, ``each`` holds
    what each request's answer may be ("OK" or an error's code name)."""

    kind: str
    method: str
    requests: tuple[bytes, ...]
    expect: frozenset[str]
    each: tuple[frozenset[str], ...] = ()

    @property
    def streaming(self) -> bool:
        return self.method in (PREFIX + "AssessStream", REFLECTION)

    def __repr__(self) -> str:  # hypothesis prints failing cases: keep the bytes readable
        shown = [r[:200].hex() + ("…" if len(r) > 200 else "") for r in self.requests]
        return (
            f"Case(kind={self.kind!r}, method={self.method!r}, expect={sorted(self.expect)}, "
            f"each={[sorted(e) for e in self.each]}, sizes={[len(r) for r in self.requests]}, "
            f"requests={shown})"
        )


def served_from(channel: grpc.Channel, max_message_bytes: int) -> Served:
    """The server's models and limits, from ListModels (``max_message_bytes``: the server's
    setting, which ListModels does not tell)."""
    from service._proto.gradprobe.v1 import reliability_pb2_grpc as pb_grpc

    stub = pb_grpc.ReliabilityStub(channel)
    infos = stub.ListModels(pb.ListModelsRequest(), timeout=60, wait_for_ready=True).models
    models = tuple(
        Model(m.name, tuple(m.input_shape), len(m.classes), m.resizes_encoded) for m in infos
    )
    return Served(models, max_message_bytes, infos[0].max_images_per_request)


def _request(method: str, images: Sequence[pb.Image], model: str, request_id: str) -> bytes:
    if method == "Predict":
        return pb.PredictRequest(images=images, model=model).SerializeToString()
    return pb.AssessRequest(images=images, model=model, request_id=request_id).SerializeToString()


def _raw(array: np.ndarray, dtype: int) -> pb.Image:
    return pb.Image(raw=pb.RawPixels(data=array.tobytes(), shape=list(array.shape), dtype=dtype))


@lru_cache(maxsize=256)
def _encoded(model: Model, fmt: str, seed: int, size: tuple[int, int] | None = None) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels(model, seed, size))
    if fmt == "ICO":
        image = image.convert("RGBA")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_declaring(width: int, height: int, depth: int = 8, color: int = 0) -> bytes:
    """A small PNG whose header declares ``width``×``height`` (a decompression bomb when large):
    a few compressed bytes of image data, then the end."""
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    data = zlib.compress(b"\x00" * 4096, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def png_with_text(png: bytes, chunks: int, kind: bytes = b"zTXt", inflated: int = 2**20) -> bytes:
    """``png`` with ``chunks`` compressed chunks of ``kind`` (zTXt, iTXt, iCCP) before its
    image data, each inflating to ``inflated`` bytes: a small file Pillow would inflate to
    megabytes of text it never needs."""
    packed = zlib.compress(b"\x00" * inflated, 9)
    bodies = {
        b"zTXt": lambda i: b"k%d\x00\x00" % i + packed,
        b"iTXt": lambda i: b"k%d\x00\x01\x00\x00\x00" % i + packed,
        b"iCCP": lambda i: b"icc\x00\x00" + packed,
    }
    extra = b"".join(_png_chunk(kind, bodies[kind](i)) for i in range(chunks))
    return png[:33] + extra + png[33:]


def with_png_size(png: bytes, width: int, height: int, fix_crc: bool) -> bytes:
    """A PNG whose IHDR says ``width``×``height``, whatever its pixel data holds."""
    ihdr = bytearray(png[8 : 8 + 25])  # length, type, 13 bytes of data, CRC
    ihdr[8:16] = struct.pack(">II", width, height)
    if fix_crc:
        ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    return png[:8] + bytes(ihdr) + png[33:]


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose start-of-frame says ``width``×``height`` (each at most 65535)."""
    data = bytearray(jpeg)
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    return bytes(data)


@lru_cache(maxsize=8)
def _real_large(fmt: str, side: int) -> bytes:
    """A genuine ``side``×``side`` image of one grey: small as a file, large decoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format=fmt)
    return buffer.getvalue()


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand (to put in what the library would
    refuse to write, e.g. invalid UTF-8)."""
    key, length = (number << 3) | 2, len(payload)
    out = bytearray([key])
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


Images = tuple[list[pb.Image], frozenset[str]]  # a request's images, the statuses they call for
ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
seeds = st.integers(0, 2**16)


class Cases:
    """The hypothesis strategies of fuzz cases against one server (``Served``)."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.names = frozenset(m.name for m in served.models)
        self.model = st.sampled_from(served.models)
        self.method = st.sampled_from(("Assess", "Predict"))

    # -- images

    def good_image(self, model: Model) -> st.SearchStrategy[pb.Image]:
        """An image the model takes: raw float32 or uint8, PNG or JPEG."""
        c, h, w = model.shape
        forms = ["float", "uint8", "png", "jpeg"] + (["hwc"] if c > 1 else ["hw"])

        def make(form: str, seed: int) -> pb.Image:
            hwc = pixels(model, seed)  # (H, W) or (H, W, C)
            chw = hwc.reshape(h, w, c).transpose(2, 0, 1)
            if form == "float":
                return _raw(np.ascontiguousarray(chw, np.float32) / np.float32(255), 2)
            if form == "uint8":
                return _raw(np.ascontiguousarray(chw), pb.RawPixels.UINT8)
            if form in ("hwc", "hw"):
                return _raw(hwc, pb.RawPixels.UINT8)
            return pb.Image(encoded=_encoded(model, form.upper(), seed % 64))

        return st.builds(make, st.sampled_from(forms), seeds)

    def _images_case(
        self,
        kind: str,
        images: Callable[[Model], st.SearchStrategy[Images]] | st.SearchStrategy[Images],
    ) -> st.SearchStrategy[Case]:
        """A unary Assess or Predict call for a served model, with the images that
        ``images`` (given the model, or for any model) draws and the statuses they call for."""

        @st.composite
        def build(draw: st.DrawFn) -> Case:
            method = draw(self.method)
            chosen = draw(self.model)
            content, expect = draw(images(chosen) if callable(images) else images)
            request = _request(method, content, chosen.name, draw(ids))
            return Case(kind, PREFIX + method, (request,), expect)

        return build()

    # -- kinds

    def valid(self) -> st.SearchStrategy[Case]:
        def images(model: Model) -> st.SearchStrategy:
            return st.lists(self.good_image(model), min_size=1, max_size=3).map(
                lambda images: (images, OK)
            )

        return self._images_case("valid", images)

    def raw_shape(self) -> st.SearchStrategy[Case]:
        """Raw pixels of any shape and dtype number, with data of any length or of the
        length the shape would take."""

        def images(model: Model) -> st.SearchStrategy:
            c, h, w = model.shape
            dim = st.one_of(
                st.integers(-(2**31), 2**31 - 1),
                st.sampled_from([0, 1, -1, c, h, w, h + 1, w - 1, 2 * h, 2**31 - 1, -(2**31)]),
            )
            near = st.sampled_from([[c, h, w], [h, w], [h, w, c], [w, h], [c, w, h], [1, c, h, w]])
            shapes = st.one_of(st.lists(dim, max_size=5), near, st.lists(dim, min_size=3))
            dtypes = st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1))

            @st.composite
            def one(draw: st.DrawFn) -> tuple[list[pb.Image], frozenset[str]]:
                shape, dtype = draw(shapes), draw(dtypes)
                itemsize = {1: 1, 2: 4}.get(dtype, 1)
                count = math.prod(shape) * itemsize if shape else 0
                if 0 < count <= 64 * 1024 and all(d > 0 for d in shape) and draw(st.booleans()):
                    data = bytes(draw(st.binary(min_size=1, max_size=16))) * count
                    data = data[:count]
                else:
                    data = draw(st.binary(max_size=1024))
                image = pb.Image(raw=pb.RawPixels(data=data, shape=shape, dtype=dtype))
                accepted = [[c, h, w]] + ([[h, w]] if c == 1 else [[h, w, c]] * (dtype == 1))
                fits = dtype in (1, 2) and shape in accepted and len(data) == c * h * w * itemsize
                # uint8 pixels are all valid; float32 bytes may be NaN or out of [0, 1].
                expect = (OK if dtype == 1 else OK_OR_INVALID) if fits else INVALID
                return [image], expect

            return one()

        return self._images_case("raw_shape", images)

    def raw_dtype(self) -> st.SearchStrategy[Case]:
        """The right shape with pixels of another numpy dtype (float64, float16, int32, ...)."""

        def images(model: Model) -> st.SearchStrategy:
            c, h, w = model.shape
            kinds = ["<f8", "<f2", "<i4", "<u2", "i1", "<i8", "?", ">f4"]

            def make(numpy_dtype: str, dtype: int, seed: int) -> tuple[list, frozenset[str]]:
                array = np.random.default_rng(seed).random((c, h, w)).astype(numpy_dtype)
                itemsize = {1: 1, 2: 4}.get(dtype)
                if itemsize is None or array.nbytes != c * h * w * itemsize:
                    return [_raw(array, dtype)], INVALID
                return [_raw(array, dtype)], OK if dtype == 1 else OK_OR_INVALID

            return st.builds(make, st.sampled_from(kinds), st.sampled_from([0, 1, 2, 3]), seeds)

        return self._images_case("raw_dtype", images)

    def raw_values(self) -> st.SearchStrategy[Case]:
        """float32 pixels of the right shape with NaN, infinities or values outside [0, 1]."""

        def images(model: Model) -> st.SearchStrategy:
            c, h, w = model.shape
            bad = st.one_of(
                st.sampled_from([math.nan, math.inf, -math.inf, -1e-45, -0.5, 1.0000001, 3e38]),
                st.floats(width=32),
            )

            @st.composite
            def one(draw: st.DrawFn) -> tuple[list[pb.Image], frozenset[str]]:
                array = np.random.default_rng(draw(seeds)).random((c, h, w), dtype=np.float32)
                flat = array.reshape(-1)
                for value in draw(st.lists(bad, min_size=1, max_size=4)):
                    flat[draw(st.integers(0, flat.size - 1))] = value
                valid = bool(np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1)
                return [_raw(array, pb.RawPixels.FLOAT32)], OK if valid else INVALID

            return one()

        return self._images_case("raw_values", images)

    def truncated(self) -> st.SearchStrategy[Case]:
        """A PNG or JPEG of the right size, cut short."""

        def images(model: Model) -> st.SearchStrategy:
            @st.composite
            def one(draw: st.DrawFn) -> tuple[list[pb.Image], frozenset[str]]:
                data = _encoded(model, draw(st.sampled_from(["PNG", "JPEG"])), draw(seeds) % 64)
                cut = draw(st.integers(0, len(data) - 1))
                # A file cut only in its trailer may still decode.
                return [pb.Image(encoded=data[:cut])], OK_OR_INVALID

            return one()

        return self._images_case("truncated", images)

    def lying_header(self) -> st.SearchStrategy[Case]:
        """A PNG or JPEG whose header declares another size than its data holds."""

        def images(model: Model) -> st.SearchStrategy:
            _, h, w = model.shape
            side = st.one_of(
                st.integers(0, 65535), st.sampled_from([h, w, h + 1, 4 * h, 2**31 - 1, 2**32 - 1])
            )

            @st.composite
            def one(draw: st.DrawFn) -> tuple[list[pb.Image], frozenset[str]]:
                width, height = draw(side), draw(side)
                if draw(st.booleans()):
                    png = _encoded(model, "PNG", draw(seeds) % 64)
                    data = with_png_size(png, width, height, draw(st.booleans()))
                else:
                    width, height = width % 65536, height % 65536
                    data = with_jpeg_size(_encoded(model, "JPEG", draw(seeds) % 64), width, height)
                fits = (width, height) == (w, h) or (
                    model.resizes and 0 < width * height <= 16 * h * w
                )
                return [pb.Image(encoded=data)], OK_OR_INVALID if fits else INVALID

            return one()

        return self._images_case("lying_header", images)

    def bomb(self) -> st.SearchStrategy[Case]:
        """Small files that decode to huge images: a PNG or JPEG header declaring up to
        2^31-1 pixels a side over a few bytes of data, or a genuine large image of one grey."""

        def images(model: Model) -> st.SearchStrategy:
            _, h, w = model.shape
            limit = 16 * h * w if model.resizes else h * w
            big = st.integers(1, 2**31 - 1)
            png = st.builds(
                png_declaring, big, big, st.sampled_from([1, 8, 16]), st.sampled_from([0, 2])
            ).filter(lambda data: struct.unpack(">II", data[16:24]) != (w, h))
            jpeg = st.builds(
                lambda seed, width, height: with_jpeg_size(
                    _encoded(model, "JPEG", seed % 64), width, height
                ),
                seeds,
                st.integers(4096, 65535),
                st.integers(4096, 65535),
            )
            real = st.builds(_real_large, st.sampled_from(["PNG", "JPEG"]), st.just(4096))
            data = st.one_of(png, jpeg, real).filter(
                lambda data: (
                    data[:4] != b"\x89PNG" or math.prod(struct.unpack(">II", data[16:24])) > limit
                )
            )
            return data.map(lambda data: ([pb.Image(encoded=data)], INVALID))

        return self._images_case("bomb", images)

    def text_bomb(self) -> st.SearchStrategy[Case]:
        """A PNG of the right size carrying compressed text or colour profile chunks that
        inflate to megabytes: the pixels are still assessed."""

        def images(model: Model) -> st.SearchStrategy:
            def make(seed: int, chunks: int, kind: bytes) -> tuple[list[pb.Image], frozenset]:
                png = png_with_text(_encoded(model, "PNG", seed % 64), chunks, kind)
                return [pb.Image(encoded=png)], OK

            return st.builds(
                make, seeds, st.integers(1, 20), st.sampled_from([b"zTXt", b"iTXt", b"iCCP"])
            )

        return self._images_case("text_bomb", images)

    def other_format(self) -> st.SearchStrategy[Case]:
        """A valid image of the right size in a format other than PNG and JPEG."""

        def images(model: Model) -> st.SearchStrategy:
            def make(fmt: str, seed: int) -> tuple[list[pb.Image], frozenset[str]]:
                return [pb.Image(encoded=_encoded(model, fmt, seed % 8))], INVALID

            return st.builds(make, st.sampled_from(OTHER_FORMATS), seeds)

        return self._images_case("other_format", images)

    def many_images(self) -> st.SearchStrategy[Case]:
        room = self.served.max_message_bytes - 1024

        def images(model: Model) -> st.SearchStrategy:
            count = st.integers(self.served.max_images + 1, self.served.max_images + 64)
            empty = st.builds(lambda n: [pb.Image()] * n, count)
            good = st.builds(lambda n, image: [image] * n, count, self.good_image(model)).filter(
                lambda images: sum(i.ByteSize() for i in images) < room
            )
            return st.one_of(empty, good).map(lambda images: (images, INVALID))

        return self._images_case("many_images", images)

    def empty(self) -> st.SearchStrategy[Case]:
        """No images, an Image with no content, empty raw pixels or empty encoded bytes."""
        nothing = st.sampled_from(
            [[], [pb.Image()], [pb.Image(raw=pb.RawPixels())], [pb.Image(encoded=b"")]]
        )
        return self._images_case("empty", nothing.map(lambda images: (images, INVALID)))

    def oversize(self) -> st.SearchStrategy[Case]:
        """A request larger than the server's max_message_bytes."""

        def build(method: str, extra: int, model: Model) -> Case:
            data = bytes(self.served.max_message_bytes + extra)
            request = _request(method, [pb.Image(encoded=data)], model.name, "big")
            return Case("oversize", PREFIX + method, (request,), frozenset({"RESOURCE_EXHAUSTED"}))

        return st.builds(build, self.method, st.integers(1, 64 * 1024), self.model)

    def unknown_model(self) -> st.SearchStrategy[Case]:
        @st.composite
        def build(draw: st.DrawFn) -> Case:
            name = draw(st.text(max_size=40).filter(lambda n: n not in self.names))
            expect = frozenset({"NOT_FOUND"})
            if not name:  # unnamed: the only model, or INVALID_ARGUMENT among several
                expect = OK if len(self.names) == 1 else INVALID
            method = draw(st.sampled_from(("Assess", "Predict", "GetModelInfo")))
            if method == "GetModelInfo":
                request = pb.GetModelInfoRequest(model=name).SerializeToString()
            else:
                image = draw(self.good_image(self.served.models[0]))
                request = _request(method, [image], name, draw(ids))
                if not name and len(self.names) == 1:
                    expect = OK
            return Case("unknown_model", PREFIX + method, (request,), expect)

        return build()

    def long_fields(self) -> st.SearchStrategy[Case]:
        """Fields far longer than any real one, of the kind error messages quote: a model name
        of thousands of characters (NOT_FOUND) or raw pixels whose shape has thousands of
        entries (INVALID_ARGUMENT). Quoted whole, they made the status trailer exceed the
        client's metadata limit: the client saw RESOURCE_EXHAUSTED, not the status."""
        # Room in the message for the field (up to 3 bytes a character) and an image.
        longest = max(1_000, min(60_000, (self.served.max_message_bytes - 16 * 1024) // 3))
        lengths = st.integers(1_000, longest)

        @st.composite
        def build(draw: st.DrawFn) -> Case:
            chosen = draw(self.model)
            if draw(st.booleans()):
                length = draw(lengths)  # characters: a served name repeated is cut to it
                name = (draw(st.sampled_from(["x", "é", "✓", chosen.name])) * length)[:length]
                method = draw(st.sampled_from(("Assess", "Predict", "GetModelInfo")))
                if method == "GetModelInfo":
                    request = pb.GetModelInfoRequest(model=name).SerializeToString()
                else:
                    image = draw(self.good_image(chosen))
                    request = _request(method, [image], name, draw(ids))
                return Case("long_fields", PREFIX + method, (request,), frozenset({"NOT_FOUND"}))
            method = draw(self.method)
            shape = [draw(st.integers(0, 127))] * draw(lengths)  # one byte an entry
            dtype = draw(st.sampled_from([pb.RawPixels.UINT8, pb.RawPixels.FLOAT32]))
            image = pb.Image(raw=pb.RawPixels(shape=shape, dtype=dtype, data=bytes(64)))
            request = _request(method, [image], chosen.name, draw(ids))
            return Case("long_fields", PREFIX + method, (request,), INVALID)

        return build()

    def bad_utf8(self) -> st.SearchStrategy[Case]:
        """A string field (model, request_id) holding bytes that are not UTF-8."""

        @st.composite
        def build(draw: st.DrawFn) -> Case:
            model = draw(self.model)
            good = _request("Assess", [draw(self.good_image(model))], model.name, "")
            junk = draw(st.binary(max_size=8)) + b"\xff" + draw(st.binary(max_size=8))
            request = good + _field(draw(st.sampled_from([2, 3])), junk)
            return Case("bad_utf8", PREFIX + "Assess", (request,), INVALID)

        return build()

    def random_bytes(self) -> st.SearchStrategy[Case]:
        """Random bytes as the serialized request of any unary method (they may happen to
        parse, as an empty message does)."""
        methods = st.sampled_from(
            [PREFIX + m for m in ("Assess", "Predict", "GetModelInfo", "ListModels")]
            + [HEALTH_CHECK]
        )
        return st.builds(
            lambda method, data: Case("random_bytes", method, (data,), DEFINED),
            methods,
            st.binary(max_size=512),
        )

    def mutated(self) -> st.SearchStrategy[Case]:
        """A valid request with bytes flipped, inserted, deleted or cut off."""

        @st.composite
        def build(draw: st.DrawFn) -> Case:
            model, method = draw(self.model), draw(self.method)
            images = draw(st.lists(self.good_image(model), min_size=1, max_size=2))
            data = bytearray(_request(method, images, model.name, draw(ids)))
            for _ in range(draw(st.integers(1, 4))):
                at = draw(st.integers(0, len(data)))
                op = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
                if op == "flip" and at < len(data):
                    data[at] ^= draw(st.integers(1, 255))
                elif op == "insert":
                    data[at:at] = draw(st.binary(min_size=1, max_size=8))
                elif op == "delete":
                    del data[at : at + draw(st.integers(1, 8))]
                elif op == "cut":
                    del data[at:]
            return Case("mutated", PREFIX + method, (bytes(data),), DEFINED)

        return build()

    def unknown_method(self) -> st.SearchStrategy[Case]:
        names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop", min_size=1)
        return st.builds(
            lambda service, name, data: Case(
                "unknown_method", f"/{service}/{name}", (data,), frozenset({"UNIMPLEMENTED"})
            ),
            st.sampled_from(["gradprobe.v1.Reliability", "gradprobe.v2.Reliability", "x.Y"]),
            names.filter(
                lambda n: (
                    n not in ("Assess", "AssessStream", "Predict", "GetModelInfo", "ListModels")
                )
            ),
            st.binary(max_size=64),
        )

    def reflection(self) -> st.SearchStrategy[Case]:
        """Server reflection fed random bytes and odd requests."""
        from grpc_reflection.v1alpha import reflection_pb2

        odd = st.builds(
            lambda symbol: reflection_pb2.ServerReflectionRequest(
                file_containing_symbol=symbol
            ).SerializeToString(),
            st.text(max_size=30),
        )
        items = st.lists(st.one_of(st.binary(max_size=64), odd), min_size=1, max_size=3)
        return items.map(lambda requests: Case("reflection", REFLECTION, tuple(requests), DEFINED))

    def stream(self) -> st.SearchStrategy[Case]:
        """An AssessStream mixing good requests, bad ones and bytes that do not parse: one
        answer per request, in order, each with its request id."""
        kinds = [
            self.valid,
            self.raw_shape,
            self.raw_values,
            self.other_format,
            self.empty,
            self.bomb,
            self.unknown_model,
            self.bad_utf8,
        ]
        items = st.one_of([kind() for kind in kinds]).filter(
            lambda case: case.method == PREFIX + "Assess"
        )

        @st.composite
        def build(draw: st.DrawFn) -> Case:
            cases = draw(st.lists(st.one_of(items, st.binary(max_size=64)), min_size=1, max_size=6))
            requests, each = [], []
            for case in cases:
                if isinstance(case, bytes):  # may parse (then it is answered as it parses)
                    requests.append(case)
                    each.append(DEFINED - {"UNIMPLEMENTED"})
                else:
                    requests.append(case.requests[0])
                    each.append(case.expect)
            return Case("stream", PREFIX + "AssessStream", tuple(requests), OK, tuple(each))

        return build()

    def all(self, oversize: bool = True) -> st.SearchStrategy[Case]:
        """Cases of every kind (``KINDS``); without oversize messages if not ``oversize``."""
        return st.one_of([getattr(self, k)() for k in KINDS if oversize or k != "oversize"])


# The kinds of case, each a method of ``Cases``.
KINDS = (
    "valid",
    "raw_shape",
    "raw_dtype",
    "raw_values",
    "truncated",
    "lying_header",
    "bomb",
    "text_bomb",
    "other_format",
    "many_images",
    "empty",
    "unknown_model",
    "long_fields",
    "bad_utf8",
    "random_bytes",
    "mutated",
    "unknown_method",
    "reflection",
    "stream",
    "oversize",
)


# ----------------------------------------------------------------------------- calls


@dataclass
class Outcome:
    code: str
    details: str
    responses: list[bytes] = field(default_factory=list)


def send(channel: grpc.Channel, case: Case, timeout: float = 60.0) -> Outcome:
    """The case's call through ``channel`` with identity serializers: bytes in, bytes out."""
    responses: list[bytes] = []
    try:
        if case.streaming:
            call = channel.stream_stream(case.method)
            for response in call(iter(case.requests), timeout=timeout):
                responses.append(response)
        else:
            responses.append(channel.unary_unary(case.method)(case.requests[0], timeout=timeout))
    except grpc.RpcError as exc:
        return Outcome(exc.code().name, exc.details() or "", responses)
    return Outcome("OK", "", responses)


def _parsed(message: type, data: bytes) -> object | None:
    try:
        return message.FromString(data)
    except Exception:
        return None


def check(case: Case, outcome: Outcome, served: Served) -> list[str]:
    """What is wrong with the server's answer to ``case`` (nothing: an empty list)."""
    problems = []
    if outcome.code in NEVER or outcome.code not in DEFINED:
        problems.append(f"status {outcome.code}: {outcome.details[:200]}")
    elif outcome.code not in case.expect:
        problems.append(
            f"status {outcome.code} where {sorted(case.expect)} was due: {outcome.details[:200]}"
        )
    if outcome.code != "OK":
        return problems
    if case.method == PREFIX + "AssessStream":
        problems += _check_stream(case, outcome, served)
    elif case.method in (PREFIX + "Assess", PREFIX + "Predict"):
        kind = pb.AssessRequest if case.method.endswith("Assess") else pb.PredictRequest
        request = _parsed(kind, case.requests[0])
        if request is not None:
            problems += _check_answer(case.method, request, outcome.responses[0], served)
    return problems


def _check_answer(method: str, request: object, data: bytes, served: Served) -> list[str]:
    model = served.model(request.model)
    count = len(request.images)
    if method.endswith("Predict"):
        answer = pb.PredictResponse.FromString(data)
        if len(answer.predictions) != count:
            return [f"{len(answer.predictions)} predictions for {count} images"]
        return []
    answer = pb.AssessResponse.FromString(data)
    problems = []
    if answer.request_id != request.request_id:
        problems.append(f"request id {answer.request_id!r} for {request.request_id!r}")
    if len(answer.results) != count:
        problems.append(f"{len(answer.results)} results for {count} images")
    for result in answer.results:
        scores = result.scores
        total = scores.in_distribution + scores.ood + scores.corrupted + scores.adversarial
        if result.verdict not in (1, 2, 3, 4) or not math.isclose(total, 1.0, abs_tol=1e-3):
            problems.append(f"verdict {result.verdict}, scores summing to {total}")
        if model is not None and len(result.probabilities) != model.classes:
            problems.append(f"{len(result.probabilities)} probabilities for {model.classes}")
    return problems


def _check_stream(case: Case, outcome: Outcome, served: Served) -> list[str]:
    if len(outcome.responses) != len(case.requests):
        return [f"{len(outcome.responses)} answers to {len(case.requests)} stream requests"]
    problems = []
    for index, (data, expect, raw) in enumerate(
        zip(outcome.responses, case.each, case.requests, strict=True)
    ):
        answer = pb.AssessResponse.FromString(data)
        request = _parsed(pb.AssessRequest, raw)
        echoed = "" if request is None else request.request_id
        if answer.request_id != echoed:
            problems.append(f"stream answer {index}: id {answer.request_id!r} for {echoed!r}")
        if answer.HasField("error"):
            code = _CODE_NAMES.get(answer.error.code, f"code {answer.error.code}")
            if code in NEVER or code not in expect:
                problems.append(
                    f"stream answer {index}: {code} where {sorted(expect)} was due: "
                    f"{answer.error.message[:200]}"
                )
        elif "OK" not in expect:
            problems.append(f"stream answer {index}: OK where {sorted(expect)} was due")
        elif request is not None:
            problems += _check_answer("Assess", request, data, served)
    return problems


def statuses_of(case: Case, outcome: Outcome) -> list[str]:
    """The statuses to count for a case: the call's, and each stream answer's."""
    if case.method != PREFIX + "AssessStream" or outcome.code != "OK":
        return [outcome.code]
    codes = []
    for data in outcome.responses:
        answer = pb.AssessResponse.FromString(data)
        codes.append(_CODE_NAMES.get(answer.error.code, "?") if answer.HasField("error") else "OK")
    return codes


def open_channel(target: str) -> grpc.Channel:
    # No client-side limits: the server's max_message_bytes is what is tested.
    return grpc.insecure_channel(
        target,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )


# ----------------------------------------------------------------------------- benchmark


@dataclass
class Tally:
    """Counts of a fuzz run."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    requests: int = 0

    def add(self, case: Case, outcome: Outcome, problems: list[str]) -> None:
        self.cases[case.kind] += 1
        self.requests += len(case.requests)
        self.statuses.setdefault(case.kind, Counter()).update(statuses_of(case, outcome))
        for problem in problems:
            if len(self.findings) < 50:
                self.findings.append(f"{case.kind}: {problem} ({case!r})"[:600])


def run_fuzz(
    channel: grpc.Channel,
    served: Served,
    count: int,
    seed: int,
    on_case: Callable[[Case, Outcome, list[str]], None],
) -> None:
    """``count`` cases, generated only (no shrinking: every case is counted as sent)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    @fixed_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(Cases(served).all())
    def one(case: Case) -> None:
        outcome = send(channel, case)
        on_case(case, outcome, check(case, outcome, served))

    one()


def run(count: int, model_dirs: Sequence[str], seed: int, progress: bool = True) -> dict:
    from benchmarks.serving_process import ServerProcess
    from service.settings import Settings

    max_message_bytes = Settings().max_message_bytes
    flags = [f"--max-message-bytes={max_message_bytes}", "-q"]
    if model_dirs:
        from service.artifacts import ensure_default_model

        flags += ["--model-dir", str(ensure_default_model(quiet=True))]
        for model_dir in model_dirs:
            flags += ["--model-dir", model_dir]
    tally = Tally()
    started = time.monotonic()
    with ServerProcess(flags) as server, open_channel(server.target) as channel:
        served = served_from(channel, max_message_bytes)
        before = probe_verdicts(server.target, served.models)
        resources_before = server.resources()
        last = [time.monotonic()]

        def on_case(case: Case, outcome: Outcome, problems: list[str]) -> None:
            tally.add(case, outcome, problems)
            if progress and time.monotonic() - last[0] > 10:
                last[0] = time.monotonic()
                print(
                    f"  {sum(tally.cases.values())}/{count} cases, {tally.requests} requests, "
                    f"{len(tally.findings)} findings, server RSS "
                    f"{server.resources()['rss_bytes'] / 2**20:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
            if not server.alive():
                raise RuntimeError(f"the server died:\n{server.log_tail()}")

        run_fuzz(channel, served, count, seed, on_case)
        alive = server.alive()
        after = probe_verdicts(server.target, served.models) if alive else {}
        resources_after = server.resources() if alive else {}
        exit_code = server.stop()
        # Tracebacks the server logged (an unexpected error is logged at ERROR).
        log_errors = [line.strip() for line in server.log if " ERROR " in line]
    return {
        "count": count,
        "seed": seed,
        "models": [f"{m.name} {list(m.shape)}" for m in served.models],
        "max_message_bytes": max_message_bytes,
        "max_images": served.max_images,
        "cases": dict(tally.cases),
        "requests": tally.requests,
        "statuses": {k: dict(v) for k, v in tally.statuses.items()},
        "findings": tally.findings,
        "alive": alive,
        "exit_code": exit_code,
        "log_errors": log_errors,
        "probes_before": before,
        "probes_after": after,
        "rss_before": resources_before["rss_bytes"],
        "rss_after": resources_after.get("rss_bytes", 0),
        "wall_s": time.monotonic() - started,
    }


FIXED = [
    "A request whose bytes do not parse (random bytes, a mutated message, invalid UTF-8 in a "
    "string field) was INTERNAL (gRPC's own answer to a deserializer that raises); it is "
    "INVALID_ARGUMENT now, for Reliability, health and reflection alike, and a stream answers "
    "it as one failed request and goes on (`service/errors.py`: `MalformedRequest`). On the "
    "reflection stream, such a message also left the server unable to stop (`stop(0)` hung) "
    "about every other time; not since.",
    "A RawPixels dtype number outside the enum (proto3 enums are open) was INTERNAL: naming it "
    "in the message raised; it is INVALID_ARGUMENT now.",
    "Encoded images went through every Pillow format's parser before a non-PNG/JPEG was "
    "refused; now only PNG's and JPEG's parsers see the bytes (`Image.open(formats=...)`), and "
    "GIF, BMP, TIFF, WebP, ICO, JPEG 2000 and PDF are refused by their signature, named.",
    "A PNG's compressed text and colour profile chunks (zTXt, iTXt, iCCP) were inflated by "
    "Pillow while opening the file: 60 KB of zTXt cost 61 MB of memory and 0.4 s per image "
    "(up to Pillow's 64 MB cap), for metadata the server never reads; they are dropped unread "
    "now (found reading the decoder, then added to the fuzzer as `text_bomb`).",
]


def markdown(r: dict) -> str:
    from benchmarks.results import environment

    codes = sorted({c for counts in r["statuses"].values() for c in counts})
    header = "| kind | cases | " + " | ".join(codes) + " |\n|---|---:|" + "---:|" * len(codes)
    rows = "\n".join(
        f"| {kind} | {r['cases'][kind]} | "
        + " | ".join(str(r["statuses"][kind].get(c, "")) for c in codes)
        + " |"
        for kind in sorted(r["cases"])
    )
    totals = Counter()
    for counts in r["statuses"].values():
        totals.update(counts)
    total_row = (
        f"| **all** | {sum(r['cases'].values())} | "
        + " | ".join(str(totals[c]) for c in codes)
        + " |"
    )
    bad = sum(totals[c] for c in NEVER)
    same = r["probes_after"] == r["probes_before"]
    findings = "\n".join(f"- {f}" for f in r["findings"]) or "- none"
    fixed = "\n".join(f"- {f}" for f in FIXED)
    ok = not r["findings"] and bad == 0 and r["alive"] and same and not r["log_errors"]
    return f"""## Fuzzing the gRPC surface (`python -m benchmarks.fuzz --count {r["count"]}`)

{environment()}. A real `gradprobe serve` process on loopback serving {", ".join(r["models"])}
(max message {r["max_message_bytes"]} bytes, at most {r["max_images"]} images a request);
{r["count"]} hypothesis cases (seed {r["seed"]}, generation only), {r["requests"]} requests
in all (streams carry several), in {r["wall_s"]:.0f} s. Statuses are those of the calls, and
for streams those of each request's answer.

{header}
{rows}
{total_row}

- INTERNAL or UNKNOWN: **{bad}**; findings (a status other than the case called for, an answer
  that does not match its request, a lost stream answer): **{len(r["findings"])}**
- errors in the server's log: **{len(r["log_errors"])}**
- server crashes: **{0 if r["alive"] else 1}** (still serving after the run, then exit status
  {r["exit_code"]} on SIGTERM); RSS {r["rss_before"] / 2**20:.0f} MiB before,
  {r["rss_after"] / 2**20:.0f} MiB after
- the probe images' (class, verdict) after the run equal those before it: **{same}**

Findings of this run:
{findings}

Findings fixed (each kept as a regression test in tests/service/test_fuzz.py):
{fixed}

Bounds, read in `service/server.py` and tested here: the message is at most
`--max-message-bytes` (gRPC refuses more, RESOURCE_EXHAUSTED); the image count is checked
before the batch is allocated; raw pixels must have the model's shape, a known dtype and
exactly the bytes those take before any array is made of them (no copy); an encoded image is
read by PNG's or JPEG's parser only, and its size is taken from the header and checked before
a pixel is decoded (bombs above are refused unread; a PNG's image data stops inflating at the
declared size). Images being decoded count against the queue's room (`--max-queue`) before
their float batch is allocated, so decoded pixels held at once stay within twice the queue's
images, whatever the number of handler threads.

Result: **{"pass" if ok else "FAIL"}**.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fuzz", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--count", type=int, default=10_000, help="fuzz cases (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        help="also serve this model dir (repeatable; the built-in model is always served)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RELIABILITY.md")
    args = parser.parse_args(argv)
    result = run(args.count, args.model_dir, args.seed)
    text = markdown(result)
    if not args.no_write:
        from benchmarks.results import RELIABILITY, write_section

        write_section("fuzz", text, RELIABILITY)
    print(text)
    return 0 if "**pass**" in text else 1


if __name__ == "__main__":
    sys.exit(main())
