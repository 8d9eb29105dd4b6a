"""The JPEG/PNG guard of a deployed model: :class:`RequireEncodedImage`, a toolkit step that refuses
bytes that are neither a PNG nor a well-formed JPEG *before* ``DecodeImage`` sees them.

The extensions' JPEG path calls libjpeg's default error handler, which terminates the whole
process (``exit``) on any fatal libjpeg error instead of returning one. For a JPEG (``FF D8 FF`` ...
``FF D9``) an ONNX ``Loop`` walks every marker segment, the header ones and, after each SOS, the
first marker past the entropy-coded data (``FF`` not followed by ``00``, ``FF`` or RST0-7), and
requires what libjpeg would otherwise abort on:
* each segment starts ``FF``, has a 2-byte big-endian length >= 2 inside the buffer; markers:
  APP0-15, COM, DQT, DHT, DRI (length 4), one SOF0/1/2 before the first SOS, SOS; after a scan
  only DHT/DQT/DRI/APP/COM/SOS in progressive files; ``FF D9`` exactly at the end (anything else,
  e.g. SOF3/5-15, arithmetic coding, a second SOI, RST or EOI in the headers, is refused);
* SOF: precision 8, 3 components (1-component JPEGs are refused with their own message: the
  decoder garbles them, and a large progressive one faulted), height and width 1..65500, sampling
  factors 1..4 dividing the maxima, <= 10 blocks per MCU, distinct component ids, table ids <= 3;
* DHT: each table class <= 1, id <= 3, <= 256 codes, a prefix code (Kraft sum < 1, as libjpeg's
  ``jpeg_make_d_derived_tbl`` checks), DC symbols <= 15, the tables filling the segment exactly;
  DQT: each table 8- or 16-bit, id <= 3, filling the segment exactly;
* SOS: after the SOF, 1..components entries, each a distinct SOF component whose quantization table
  is defined and whose used Huffman tables are defined or 0/1 (libjpeg substitutes standard ones);
  baseline: a single scan of all components; progressive: spectral/approximation parameters
  libjpeg's ``jdphuff`` accepts (DC band Se = 0; AC band one component, Ss <= Se < 64; Al = Ah - 1
  when refining; Al <= 13).

Entropy-coded bytes are not checked beyond the markers among them: libjpeg only warns about corrupt
coefficients (the image decodes with garbage). The walk is stricter than libjpeg in places (unused bad Huffman tables, fill bytes
before markers, non-interleaved baseline scans, quantization tables first defined after the
first scan are refused).

A refusal is a ``Reshape`` that fails at run time, named so that onnxruntime's error message says why
(:func:`laqonnx.deployment._steps._refuse_unless`). What remains possible: a fatal libjpeg error
this walk does not foresee still ends the process (fuzzing with ``tests/jpeg_fuzz.py``, 15,600
corrupted variants, found none). A declared size (PNG IHDR, JPEG SOF) above the deploy-time
``max_image_pixels`` is refused before decoding, so a small file cannot make the decoder allocate
gigabytes (a PNG whose first chunk is not IHDR is refused too). The walk costs a few passes over
the bytes plus one small step per segment: about 3-8 ms per MB of JPEG on one thread here (decode
alone: 26-50 ms per MB), noisy shared machine. This module imports onnxruntime-extensions at
import time: import it only after ``laqonnx.errors.require("onnxruntime_extensions", "deploy")``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._graph_ops import _B, _I, _all, _any, _in, _Ops, _pick, _vec_all
from ._steps import _const, _GraphStep, _refuse_unless

__all__ = ["RequireEncodedImage"]

PNG_SIGNATURE = (0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A)
JPEG_START = (0xFF, 0xD8, 0xFF)
JPEG_END = (0xFF, 0xD9)


_HEADER_MARKERS = (0xC0, 0xC1, 0xC2, 0xC4, 0xDA, 0xDB, 0xDD, *range(0xE0, 0xF0), 0xFE)
_BETWEEN_SCANS = (0xC4, 0xDA, 0xDB, 0xDD, *range(0xE0, 0xF0), 0xFE)


def _tables_body(xs: str, last: str) -> onnx.GraphProto:
    """Loop body over the tables of one DHT or DQT segment.

    State: q, ok, quantization tables defined [4], Huffman tables defined [8] (DC 0-3, AC 0-3).
    """
    o = _Ops("t_")
    g = lambda i: o.Cast(o.Gather(xs, o.Min(i, last)), to=_I)  # noqa: E731
    q, ok, qdef, hdef = "t_q_in", "t_ok_in", "t_qdef_in", "t_hdef_in"
    head = g(q)
    cls, tid = o.Div(head, o.const(16)), o.Mod(head, o.const(16))
    # DHT: class <= 1, id <= 3, at most 256 symbols, a prefix code libjpeg accepts (Kraft sum < 1, as its
    # jpeg_make_d_derived_tbl checks), DC symbols <= 15
    counts = g(o.Add(q, o.const(np.arange(1, 17))))
    total = o.ReduceSum(counts, keepdims=0)
    kraft = o.ReduceSum(o.Mul(counts, o.const(2 ** (15 - np.arange(16)))), keepdims=0)
    pos256 = o.const(np.arange(256))
    symbols = g(o.Add(o.Add(q, o.const(17)), pos256))
    dc_symbol_ok = _vec_all(o, o.Or(o.LessOrEqual(symbols, o.const(15)), o.GreaterOrEqual(pos256, total)))
    dht_ok = _all(o, o.LessOrEqual(cls, o.const(1)), o.LessOrEqual(tid, o.const(3)),
                  o.LessOrEqual(total, o.const(256)), o.Less(kraft, o.const(65536)),
                  o.Or(o.Equal(cls, o.const(1)), dc_symbol_ok))
    # DQT: precision 0 (8-bit) or 1 (16-bit), id <= 3
    dqt_ok = _all(o, o.LessOrEqual(cls, o.const(1)), o.LessOrEqual(tid, o.const(3)))
    step = o.Where("w_is_dht", o.Add(total, o.const(17)), o.Add(o.Mul(cls, o.const(64)), o.const(65)))
    q_next = o.Add(q, step)
    ok_next = _all(o, ok, _pick(o, "w_is_dht", dht_ok, dqt_ok), o.LessOrEqual(q_next, "w_end"))
    defined = o.And(o.Not("w_is_dht"), o.Equal(o.const(np.arange(4)), tid))
    o.Identity(q_next, outputs=["t_q_out"])
    o.Identity(ok_next, outputs=["t_ok_out"])
    o.Or(qdef, defined, outputs=["t_qdef_out"])
    slot = o.Add(o.Mul(o.Min(cls, o.const(1)), o.const(4)), tid)
    o.Or(hdef, o.And("w_is_dht", o.Equal(o.const(np.arange(8)), slot)), outputs=["t_hdef_out"])
    o.And(ok_next, o.Less(q_next, "w_end"), outputs=["t_cond_out"])
    vi = helper.make_tensor_value_info
    return helper.make_graph(
        o.nodes, "jpeg_tables",
        [vi("t_iter", _I, []), vi("t_cond", _B, []), vi(q, _I, []), vi(ok, _B, []), vi(qdef, _B, [4]),
         vi(hdef, _B, [8])],
        [vi("t_cond_out", _B, []), vi("t_q_out", _I, []), vi("t_ok_out", _B, []), vi("t_qdef_out", _B, [4]),
         vi("t_hdef_out", _B, [8])],
    )


def _walk_body(xs: str, last: str, n: str, markers: str) -> onnx.GraphProto:
    """Loop body: validate the marker segment at ``pos`` and move to the next one (see RequireEncodedImage).

    ``markers``: the sorted positions of the markers outside header segments could be, then a sentinel.
    """
    o = _Ops("w_")
    g = lambda i: o.Cast(o.Gather(xs, o.Min(i, last)), to=_I)  # noqa: E731
    at = lambda k: o.Add("w_pos", o.const(k))  # noqa: E731
    c = o.const
    pos, seen_sos, sof_pos, prog, qdef, hdef = "w_pos", "w_seen_sos", "w_sof_pos", "w_prog", "w_qdef", "w_hdef"
    b0, b1 = g(pos), g(at(1))
    length = o.Add(o.Mul(g(at(2)), c(256)), g(at(3)))
    seg_end = o.Add(at(2), length)
    is_end = _all(o, o.Equal(b1, c(0xD9)), o.Equal(pos, o.Sub(n, c(2))), seen_sos)
    is_sof = _in(o, b1, (0xC0, 0xC1, 0xC2))
    is_sos, is_dht, is_dqt = o.Equal(b1, c(0xDA)), o.Equal(b1, c(0xC4)), o.Equal(b1, c(0xDB))
    marker_ok = _any(o, is_end, o.And(o.Not(seen_sos), _in(o, b1, _HEADER_MARKERS)),
                     _all(o, seen_sos, prog, _in(o, b1, _BETWEEN_SCANS)))
    length_ok = _any(o, is_end, o.And(o.GreaterOrEqual(length, c(2)), o.LessOrEqual(seg_end, n)))
    # SOF0/1/2: the only one, before any scan; 8-bit, 1 or 3 components, 1..65500 pixels each way,
    # sampling factors 1..4 dividing the maxima, <= 10 blocks per MCU, quantization table ids <= 3
    nc = g(at(9))
    height = o.Add(o.Mul(g(at(5)), c(256)), g(at(6)))
    width = o.Add(o.Mul(g(at(7)), c(256)), g(at(8)))
    k3 = c(np.arange(3))
    comp = o.Add(o.Add(pos, c(10)), o.Mul(k3, c(3)))
    active = o.Less(k3, nc)
    hv = g(o.Add(comp, c(1)))
    h, v = o.Div(hv, c(16)), o.Mod(hv, c(16))
    in14 = lambda t: o.And(o.GreaterOrEqual(t, c(1)), o.LessOrEqual(t, c(4)))  # noqa: E731
    factors_ok = _vec_all(o, o.Or(o.Not(active), _all(o, in14(h), in14(v), o.LessOrEqual(g(o.Add(comp, c(2))), c(3)))))
    h1, v1 = o.Where(o.And(active, in14(h)), h, c(1)), o.Where(o.And(active, in14(v)), v, c(1))
    hmax, vmax = o.ReduceMax(h1, keepdims=0), o.ReduceMax(v1, keepdims=0)
    divides = _vec_all(o, o.And(o.Equal(o.Mod(hmax, h1), c(0)), o.Equal(o.Mod(vmax, v1), c(0))))
    blocks = o.ReduceSum(o.Where(active, o.Mul(h1, v1), c(0)), keepdims=0)
    ids = g(comp)
    distinct = o.Or(o.Equal(nc, c(1)), _all(o, o.Not(o.Equal(o.Gather(ids, c(0)), o.Gather(ids, c(1)))),
                                            o.Not(o.Equal(o.Gather(ids, c(0)), o.Gather(ids, c(2)))),
                                            o.Not(o.Equal(o.Gather(ids, c(1)), o.Gather(ids, c(2))))))
    sof_ok = _all(o, o.Less(sof_pos, c(0)), o.Equal(g(at(4)), c(8)), _in(o, nc, (1, 3)),
                  o.Equal(length, o.Add(c(8), o.Mul(nc, c(3)))),
                  o.GreaterOrEqual(height, c(1)), o.LessOrEqual(height, c(65500)),
                  o.GreaterOrEqual(width, c(1)), o.LessOrEqual(width, c(65500)),
                  factors_ok, divides, o.Or(o.Equal(nc, c(1)), o.LessOrEqual(blocks, c(10))), distinct)
    # SOS: after the SOF; 1..nc components, each a distinct SOF component with tables defined (quantization)
    # or in range (Huffman: libjpeg substitutes the standard ones); baseline: one scan of all components;
    # progressive: parameters libjpeg's jdphuff accepts
    sof_nc = g(o.Add(sof_pos, c(9)))
    sof_comp = o.Add(o.Add(sof_pos, c(10)), o.Mul(k3, c(3)))
    sof_active = o.Less(k3, sof_nc)
    sof_ids = g(sof_comp)
    sof_tq = o.Min(g(o.Add(sof_comp, c(2))), c(3))
    tq_defined = o.Or(o.Not(sof_active), o.Gather(qdef, sof_tq))
    ns = g(at(4))
    j4 = c(np.arange(4))
    scomp = o.Add(o.Add(pos, c(5)), o.Mul(j4, c(2)))
    sactive = o.Less(j4, ns)
    cs, tsel = g(scomp), g(o.Add(scomp, c(1)))
    col = lambda t: o.Unsqueeze(t, c([1]))  # noqa: E731
    row = lambda t: o.Unsqueeze(t, c([0]))  # noqa: E731
    matches = o.And(o.Equal(col(cs), row(sof_ids)), row(sof_active))
    found = o.Cast(o.ReduceMax(o.Cast(matches, to=_I), c([1]), keepdims=0), to=_B)
    same = o.And(o.Equal(col(cs), row(cs)), o.And(col(sactive), row(sactive)))
    once = o.Equal(o.ReduceSum(o.Cast(same, to=_I), keepdims=0), ns)
    tail = o.Add(at(5), o.Mul(ns, c(2)))
    ss, se, ahal = g(tail), g(o.Add(tail, c(1))), g(o.Add(tail, c(2)))
    ah, al = o.Div(ahal, c(16)), o.Mod(ahal, c(16))
    dc_band = o.Equal(ss, c(0))
    # Huffman tables the scan uses (baseline: both; progressive: DC on a first DC scan, AC on AC scans)
    # must be defined or be 0/1, for which libjpeg substitutes the standard tables
    td, ta = o.Div(tsel, c(16)), o.Mod(tsel, c(16))
    usable = lambda t, base: o.Or(o.LessOrEqual(t, c(1)), o.And(  # noqa: E731
        o.LessOrEqual(t, c(3)), o.Gather(hdef, o.Add(o.Min(t, c(3)), c(base)))))
    need_dc = o.Or(o.Not(prog), o.And(dc_band, o.Equal(ah, c(0))))
    need_ac = o.Or(o.Not(prog), o.Not(dc_band))
    sel_ok = _vec_all(o, o.Or(o.Not(sactive), _all(o, found, o.Or(o.Not(need_dc), usable(td, 0)),
                                                    o.Or(o.Not(need_ac), usable(ta, 4)))))
    prog_ok = _all(o, _pick(o, dc_band, o.Equal(se, c(0)),
                              _all(o, o.LessOrEqual(ss, se), o.Less(se, c(64)), o.Equal(ns, c(1)))),
                   o.Or(o.Equal(ah, c(0)), o.Equal(al, o.Sub(ah, c(1)))), o.LessOrEqual(al, c(13)))
    sos_ok = _all(o, o.GreaterOrEqual(sof_pos, c(0)), o.GreaterOrEqual(ns, c(1)), o.LessOrEqual(ns, sof_nc),
                  o.Equal(length, o.Add(c(6), o.Mul(ns, c(2)))), sel_ok, once, _vec_all(o, tq_defined),
                  _pick(o, prog, prog_ok, o.Equal(ns, sof_nc)))
    # DHT / DQT: walk the tables inside the segment
    o.Identity(seg_end, outputs=["w_end"])
    o.Identity(is_dht, outputs=["w_is_dht"])
    tables = o.Or(is_dht, is_dqt)
    q0 = at(4)
    t_cond = o.And(tables, o.Less(q0, seg_end))
    t_q, t_ok, t_qdef, t_hdef = o._name(), o._name(), o._name(), o._name()
    o.nodes.append(helper.make_node("Loop", [c(64), t_cond, q0, tables, qdef, hdef], [t_q, t_ok, t_qdef, t_hdef],
                                    body=_tables_body(xs, last)))
    tables_ok = o.Or(o.Not(tables), o.And(t_ok, o.Equal(t_q, seg_end)))
    dri_ok = o.Or(o.Not(o.Equal(b1, c(0xDD))), o.Equal(length, c(4)))
    ok = _all(o, o.Equal(b0, c(0xFF)), marker_ok, length_ok, o.Or(o.Not(is_sof), sof_ok),
              o.Or(o.Not(is_sos), sos_ok), tables_ok, dri_ok)
    # next: after a SOS the first marker past the entropy-coded data, else the next segment
    first_marker = o.ReduceMin(o.Where(o.GreaterOrEqual(markers, seg_end), markers, c(1 << 40)), keepdims=0)
    o.Where(is_sos, first_marker, seg_end, outputs=["w_pos_out"])
    o.Identity(ok, outputs=["w_ok_out"])
    o.Identity(is_end, outputs=["w_done_out"])
    o.Or(seen_sos, is_sos, outputs=["w_seen_sos_out"])
    o.Where(is_sof, pos, sof_pos, outputs=["w_sof_pos_out"])
    o.Or(prog, o.And(is_sof, o.Equal(b1, c(0xC2))), outputs=["w_prog_out"])
    o.Identity(_pick(o, tables, t_qdef, qdef), outputs=["w_qdef_out"])
    o.Identity(_pick(o, tables, t_hdef, hdef), outputs=["w_hdef_out"])
    o.And(ok, o.Not(is_end), outputs=["w_cond_out"])
    vi = helper.make_tensor_value_info
    state = [("w_pos", _I, []), ("w_ok", _B, []), ("w_done", _B, []), ("w_seen_sos", _B, []),
             ("w_sof_pos", _I, []), ("w_prog", _B, []), ("w_qdef", _B, [4]), ("w_hdef", _B, [8])]
    return helper.make_graph(
        o.nodes, "jpeg_segments",
        [vi("w_iter", _I, []), vi("w_cond", _B, []), *(vi(nm, t, s) for nm, t, s in state)],
        [vi("w_cond_out", _B, []), *(vi(nm + "_out", t, s) for nm, t, s in state)],
    )


def _jpeg_structure_nodes(xi: str, out: str, components: str, height: str, width: str) -> list[onnx.NodeProto]:
    """Nodes computing the bool scalar ``out``: the int32 bytes ``xi`` parse as a JPEG libjpeg will not abort on.

    ``components``, ``height``, ``width`` (int64 scalars) are the SOF's when ``out`` is true.
    """
    o = _Ops("j_")
    n = o.Size(xi)
    xs = o.Concat(xi, o.const(np.zeros(16), np.int32), axis=0)
    last = o.Sub(o.Size(xs), o.const(1))
    # entropy-coded data: FF followed by 00 (stuffing), FF (fill) or RST0-7 is not a marker; the
    # positions of the others, then a sentinel far past the end (the walk refuses it: padding is not FF)
    i32 = lambda v: o.const(v, np.int32)  # noqa: E731
    cur = o.Slice(xi, o.const([0]), o.const([-1]))
    nxt = o.Slice(xi, o.const([1]), o.const([np.iinfo(np.int64).max]))
    follower_ok = _all(o, o.Not(o.Equal(nxt, i32(0))), o.Not(o.Equal(nxt, i32(0xFF))),
                       o.Or(o.Less(nxt, i32(0xD0)), o.Greater(nxt, i32(0xD7))))
    found = o.Squeeze(o.NonZero(o.And(o.Equal(cur, i32(0xFF)), follower_ok)), o.const([0]))
    markers = o.Concat(found, o.const([1 << 40]), axis=0)
    f = o.const(False, np.bool_)
    o.nodes.append(helper.make_node(
        "Loop", [n, o.const(True, np.bool_), o.const(2), o.const(True, np.bool_), f, f, o.const(-1), f,
                 o.const(np.zeros(4), np.bool_), o.const(np.zeros(8), np.bool_)],
        ["j_pos", "j_ok", "j_done", "j_seen", "j_sof", "j_prog", "j_qdef", "j_hdef"],
        body=_walk_body(xs, last, n, markers)))
    o.And("j_ok", "j_done", outputs=[out])
    sof_byte = lambda k: o.Cast(o.Gather(xs, o.Max(o.Add("j_sof", o.const(k)), o.const(0))), to=_I)  # noqa: E731
    o.Identity(sof_byte(9), outputs=[components])
    o.Add(o.Mul(sof_byte(5), o.const(256)), sof_byte(6), outputs=[height])
    o.Add(o.Mul(sof_byte(7), o.const(256)), sof_byte(8), outputs=[width])
    return o.nodes


def _walk_if_jpeg(xi: str, starts_like_jpeg: str) -> list[onnx.NodeProto]:
    """The segment walk, run only on bytes that start like a JPEG (an ``If``): on a PNG its
    temporaries (~8 bytes per input byte) would be wasted. Outputs ``jpeg_walk_ok`` (bool) and the
    SOF's ``jpeg_components``, ``jpeg_height``, ``jpeg_width`` (int64; False and 0 otherwise)."""
    names = ("jpeg_walk_ok", "jpeg_components", "jpeg_height", "jpeg_width")
    kinds = (_B, _I, _I, _I)
    vi = helper.make_tensor_value_info
    walk = helper.make_graph(_jpeg_structure_nodes(xi, *(f"walk_{n}" for n in names)), "jpeg_walk", [],
                             [vi(f"walk_{n}", k, []) for n, k in zip(names, kinds)])
    skip = helper.make_graph([_const(f"skip_{names[0]}", np.array(False)),
                              *(_const(f"skip_{n}", np.array(0, np.int64)) for n in names[1:])], "not_a_jpeg", [],
                             [vi(f"skip_{n}", k, []) for n, k in zip(names, kinds)])
    return [helper.make_node("Cast", [starts_like_jpeg], ["starts_like_jpeg"], to=_B),
            helper.make_node("If", ["starts_like_jpeg"], list(names), then_branch=walk, else_branch=skip)]


def _size_nodes(xi: str, is_png: str, jpeg_height: str, jpeg_width: str, max_pixels: int, out: str) -> list[onnx.NodeProto]:
    """Nodes computing the int64 scalar ``out``: 1 if the declared image size is within ``max_pixels``
    (PNG: a first chunk IHDR, width and height big-endian at bytes 16..23, each >= 1; JPEG: the SOF's)."""
    o = _Ops("size_")
    first = o.Slice(xi, o.const([0]), o.const([24]))  # then pad: a padded copy of all of xi would cost 4 B a byte
    head = o.Cast(o.Slice(o.Concat(first, o.const(np.zeros(24), np.int32), axis=0), o.const([0]), o.const([24])), to=_I)
    word = lambda at: o.ReduceSum(o.Mul(o.Slice(head, o.const([at]), o.const([at + 4])),  # noqa: E731
                                        o.const([1 << 24, 1 << 16, 1 << 8, 1])), keepdims=0)
    ihdr = _vec_all(o, o.Equal(o.Slice(head, o.const([12]), o.const([16])), o.const(list(b"IHDR"))))
    png = o.Cast(is_png, to=_B)
    png_ok = _all(o, ihdr, o.GreaterOrEqual(word(16), o.const(1)), o.GreaterOrEqual(word(20), o.const(1)))
    h, w = o.Where(png, word(20), jpeg_height), o.Where(png, word(16), jpeg_width)
    limit = o.const(int(max_pixels))
    # each side first, so that the product (<= limit**2) cannot overflow int64
    fits = _all(o, o.LessOrEqual(h, limit), o.LessOrEqual(w, limit), o.LessOrEqual(o.Mul(h, w), limit))
    o.Cast(o.And(fits, o.Or(o.Not(png), png_ok)), to=_I, outputs=[out])
    return o.nodes


class RequireEncodedImage(_GraphStep):
    """Pass the bytes through if they are a PNG (signature) or a 3-component JPEG the segment walk accepts,
    declaring at most ``max_pixels`` pixels (PNG IHDR, JPEG SOF), before anything is decoded."""

    def __init__(self, max_pixels: int, name: str | None = None) -> None:
        super().__init__(["image"], ["checked_image"], name)
        self.max_pixels = int(max_pixels)

    def _create_graph_for_step(self, graph: onnx.GraphProto, onnx_opset: int) -> onnx.GraphProto:
        elem, dims = self._io(graph)
        if elem != TensorProto.UINT8 or len(dims) != 1:
            raise ValueError("the encoded image input must be a 1-D uint8 tensor")
        x, y = self.input_names[0], self.output_names[0]
        i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
        nodes = [
            helper.make_node("Cast", [x], ["xi"], to=TensorProto.INT32),
            _const("pad8", np.zeros(8, np.int32)),
            _const("pad2", np.zeros(2, np.int32)),
            # slice before padding: a padded copy of the whole input would cost 4 bytes per input byte
            _const("zero", i64(0)), _const("three", i64(3)), _const("eight", i64(8)), _const("one_component", i64(1)),
            _const("minus2", i64(-2)), _const("big", i64(np.iinfo(np.int64).max)),
            helper.make_node("Slice", ["xi", "zero", "eight"], ["head_raw"]),
            helper.make_node("Slice", ["xi", "minus2", "big"], ["tail_raw"]),
            helper.make_node("Concat", ["head_raw", "pad8"], ["head_padded"], axis=0),
            helper.make_node("Concat", ["pad2", "tail_raw"], ["tail_padded"], axis=0),
            helper.make_node("Slice", ["head_padded", "zero", "eight"], ["head8"]),
            helper.make_node("Slice", ["head_padded", "zero", "three"], ["head3"]),
            helper.make_node("Slice", ["tail_padded", "minus2", "big"], ["tail2"]),
            _const("png_sig", np.array(PNG_SIGNATURE, np.int32)),
            _const("jpeg_start", np.array(JPEG_START, np.int32)),
            _const("jpeg_end", np.array(JPEG_END, np.int32)),
        ]
        flags = []
        for value, const in (("head8", "png_sig"), ("head3", "jpeg_start"), ("tail2", "jpeg_end")):
            nodes += [
                helper.make_node("Equal", [value, const], [f"{const}_eq"]),
                helper.make_node("Cast", [f"{const}_eq"], [f"{const}_eq64"], to=TensorProto.INT64),
                helper.make_node("ReduceMin", [f"{const}_eq64"], [f"{const}_ok"], keepdims=0),
            ]
            flags.append(f"{const}_ok")
        nodes += [
            *_walk_if_jpeg("xi", "jpeg_start_ok"),
            helper.make_node("Cast", ["jpeg_walk_ok"], ["jpeg_walk_ok64"], to=TensorProto.INT64),
            helper.make_node("Min", [flags[1], flags[2]], ["jpeg_ends_ok"]),
            helper.make_node("Min", ["jpeg_ends_ok", "jpeg_walk_ok64"], ["jpeg_ok"]),
            helper.make_node("Max", [flags[0], "jpeg_ok"], ["ok"]),
            *_refuse_unless("ok", x, 1, "well_formed", "refused:_input_bytes_are_not_a_PNG_or_a_well-formed_JPEG"),
            # the decoder mishandles 1-component JPEGs (garbled pixels; a memory fault on large progressive ones)
            helper.make_node("Equal", ["jpeg_components", "one_component"], ["is_gray"]),
            helper.make_node("Not", ["is_gray"], ["not_gray"]),
            helper.make_node("Cast", ["not_gray"], ["not_gray64"], to=TensorProto.INT64),
            helper.make_node("Max", [flags[0], "not_gray64"], ["color_ok"]),
            *_refuse_unless("color_ok", "well_formed", 1, "in_colour", "refused:_grayscale_JPEG_unsupported_by_decoder"),
            # a decompression bomb (a small file declaring a huge image) is refused before the decoder allocates it
            *_size_nodes("xi", flags[0], "jpeg_height", "jpeg_width", self.max_pixels, "size_ok"),
            *_refuse_unless("size_ok", "in_colour", 1, y,
                            f"refused:_image_larger_than_max_image_pixels={self.max_pixels}_(declared_width_x_height)"),
        ]
        t = [helper.make_tensor_value_info(n, TensorProto.UINT8, dims) for n in (x, y)]
        return self._graph(nodes, [t[0]], [t[1]])
