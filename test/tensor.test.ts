import { fc, test } from "@fast-check/vitest"
import * as ort from "onnxruntime-node"
import { inspect } from "node:util"
import { describe, expect, expectTypeOf, it } from "vitest"
import * as DType from "../src/core/DType.js"
import * as Index from "../src/core/Index.js"
import { type Element, InvalidTensor, Tensor } from "../src/core/Tensor.js"

const caught = (f: () => unknown): unknown => {
  try {
    f()
  } catch (e) {
    return e
  }
  throw new Error("expected a throw")
}

const product = (shape: ReadonlyArray<number>) => shape.reduce((a, b) => a * b, 1)

/** Elementwise map in the tensor's own dtype (float32 results round like torch's float32 ops). */
const map = <D extends DType.DType>(t: Tensor<D>, f: (x: number) => number): Tensor<D> =>
  Tensor.from(t.toNumbers().map(f), t.dtype, t.shape)

// ---------------------------------------------------------------------------
// arbitraries: tensors of every dtype, built through the raw constructor so
// that the code under test does not make its own test data

const elementArb = (dtype: DType.DType): fc.Arbitrary<number | bigint | string> => {
  switch (dtype) {
    case "float32":
      return fc.float({ noNaN: true })
    case "float64":
      return fc.double({ noNaN: true })
    case "float16":
      // raw half words, NaNs excluded (NaN equals nothing)
      return fc.integer({ min: 0, max: 0xffff }).filter((h) => (h & 0x7c00) !== 0x7c00 || (h & 0x3ff) === 0)
    case "int8":
      return fc.integer({ min: -128, max: 127 })
    case "int16":
      return fc.integer({ min: -32768, max: 32767 })
    case "int32":
      return fc.integer()
    case "uint8":
    case "bool":
      return fc.integer({ min: 0, max: dtype === "bool" ? 1 : 255 })
    case "uint16":
      return fc.integer({ min: 0, max: 0xffff })
    case "uint32":
      return fc.integer({ min: 0, max: 0xffffffff })
    case "int64":
      return fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n })
    case "uint64":
      return fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })
    case "string":
      return fc.string({ maxLength: 4 })
  }
}

const shapeArb = fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 4 })

const tensorArb = (
  dtypes: ReadonlyArray<DType.DType> = DType.all,
  shapes: fc.Arbitrary<Array<number>> = shapeArb
): fc.Arbitrary<Tensor> =>
  fc.tuple(fc.constantFrom(...dtypes), shapes).chain(([dtype, shape]) =>
    fc.array(elementArb(dtype), { minLength: product(shape), maxLength: product(shape) }).map((values) => {
      const data = DType.arrayFor(dtype, values.length)
      values.forEach((v, i) => ((data as unknown as Array<unknown>)[i] = v))
      return new Tensor(dtype, shape, data)
    })
  )

// ---------------------------------------------------------------------------
// naive basic indexing: visits every input coordinate and decides where (if
// anywhere) it lands; shares no code with Index.resolve

const flatElements = (t: Tensor): Array<Element> => {
  const a = t.toArray()
  return Array.isArray(a) ? (a as Array<unknown>).flat(Infinity as 1) as Array<Element> : [a as Element]
}

type Naive = { shape: Array<number>; values: Array<Element> } | "InvalidIndex" | "TooManyIndices" | "IndexOutOfRange"

const naiveAt = (t: Tensor, items: ReadonlyArray<Index.Item>): Naive => {
  type K =
    | { k: "int"; i: number }
    | { k: "slice"; start?: number; stop?: number; step: number }
    | { k: "new" }
    | { k: "ellipsis" }
  const kinds: Array<K> = items.map((it): K => {
    if (it === null) return { k: "new" }
    if (typeof it === "number") return { k: "int", i: it }
    if (it === "...") return { k: "ellipsis" }
    if (typeof it === "string") {
      const [a, b, c] = it.split(":").map((p) => (p === "" ? undefined : Number(p)))
      return { k: "slice", start: a, stop: b, step: c ?? 1 }
    }
    return { k: "slice", start: it.start ?? undefined, stop: it.stop ?? undefined, step: it.step ?? 1 }
  })
  if (kinds.filter((k) => k.k === "ellipsis").length > 1) return "InvalidIndex"
  const rank = t.rank
  const consuming = kinds.filter((k) => k.k === "int" || k.k === "slice").length
  if (consuming > rank) return "TooManyIndices"
  const expanded: Array<K> = []
  for (const k of kinds) {
    if (k.k === "ellipsis") for (let i = 0; i < rank - consuming; i++) expanded.push({ k: "slice", step: 1 })
    else expanded.push(k)
  }
  if (!kinds.some((k) => k.k === "ellipsis")) for (let i = consuming; i < rank; i++) expanded.push({ k: "slice", step: 1 })

  // per input dim: the selected positions in output order, and whether the dim is kept
  const sel: Array<{ keep: boolean; pos: Array<number> }> = []
  const outShape: Array<number> = []
  for (const k of expanded) {
    if (k.k === "new") {
      outShape.push(1)
      continue
    }
    const n = t.shape[sel.length]
    if (k.k === "int") {
      const i = k.i < 0 ? k.i + n : k.i
      if (i < 0 || i >= n) return "IndexOutOfRange"
      sel.push({ keep: false, pos: [i] })
      continue
    }
    if (k.k !== "slice") continue
    const pos: Array<number> = []
    if (k.step > 0) {
      const s = k.start === undefined ? 0 : k.start < 0 ? Math.max(k.start + n, 0) : k.start
      const e = k.stop === undefined ? n : k.stop < 0 ? k.stop + n : k.stop
      for (let i = 0; i < n; i++) if (i >= s && i < e && (i - s) % k.step === 0) pos.push(i)
    } else {
      const s = k.start === undefined ? n - 1 : k.start < 0 ? k.start + n : Math.min(k.start, n - 1)
      const e = k.stop === undefined ? -1 : k.stop < 0 ? Math.max(k.stop + n, -1) : k.stop
      for (let i = n - 1; i >= 0; i--) if (i <= s && i > e && (s - i) % -k.step === 0) pos.push(i)
    }
    sel.push({ keep: true, pos })
    outShape.push(pos.length)
  }
  const newAt = expanded.flatMap((k, j) => (k.k === "new" ? [expanded.slice(0, j).filter((x) => x.k !== "int").length] : []))
  const out = new Array<Element>(product(outShape))
  const source = flatElements(t)
  for (let f = 0; f < t.size; f++) {
    // coordinates of element f
    const coord: Array<number> = []
    let r = f
    for (let d = rank - 1; d >= 0; d--) {
      coord[d] = r % t.shape[d]
      r = Math.floor(r / t.shape[d])
    }
    const outCoord: Array<number> = []
    let selected = true
    coord.forEach((c, d) => {
      const at = sel[d].pos.indexOf(c)
      if (at < 0) selected = false
      else if (sel[d].keep) outCoord.push(at)
    })
    if (!selected) continue
    for (const a of newAt) outCoord.splice(a, 0, 0)
    let o = 0
    outCoord.forEach((c, d) => (o = o * outShape[d] + c))
    out[o] = source[f]
  }
  return { shape: outShape, values: out }
}

const boundArb = fc.option(fc.integer({ min: -6, max: 6 }), { nil: undefined })
const itemArb: fc.Arbitrary<Index.Item> = fc.oneof(
  fc.integer({ min: -5, max: 5 }),
  fc.constant(null),
  fc.constant("..."),
  fc
    .tuple(boundArb, boundArb, fc.option(fc.integer({ min: -3, max: 3 }).filter((s) => s !== 0), { nil: undefined }))
    .map(([a, b, c]) => (c === undefined ? `${a ?? ""}:${b ?? ""}` : `${a ?? ""}:${b ?? ""}:${c}`)),
  fc.record({ start: boundArb, stop: boundArb, step: fc.integer({ min: 1, max: 3 }) })
)

// ---------------------------------------------------------------------------

describe("Tensor.from", () => {
  it("infers shape and dtype", () => {
    const t = Tensor.from([[1, 2, 3], [4, 5, 6]])
    expect(t.dtype).toBe("float32")
    expect(t.shape).toEqual([2, 3])
    expect(t.data).toEqual(new Float32Array([1, 2, 3, 4, 5, 6]))
    expect([t.size, t.rank, t.ndim]).toEqual([6, 2, 2])
    expect(Tensor.from([1n, 2n]).dtype).toBe("int64")
    expect(Tensor.from([[true], [false]]).dtype).toBe("bool")
    expect(Tensor.from(["a", "b"]).dtype).toBe("string")
    expect(Tensor.from([1n, true]).dtype).toBe("int64")
    expect(Tensor.from([1n, 2.5]).dtype).toBe("float32")
    expect(Tensor.from([]).shape).toEqual([0])
    expect(Tensor.from([[], []]).shape).toEqual([2, 0])
  })

  it("types the dtype it infers", () => {
    expectTypeOf(Tensor.from([[1, 2]])).toEqualTypeOf<Tensor<"float32">>()
    expectTypeOf(Tensor.from([1n])).toEqualTypeOf<Tensor<"int64">>()
    expectTypeOf(Tensor.from([[true]])).toEqualTypeOf<Tensor<"bool">>()
    expectTypeOf(Tensor.from(new Float64Array(1))).toEqualTypeOf<Tensor<"float64">>()
    expectTypeOf(Tensor.from(new BigInt64Array(1))).toEqualTypeOf<Tensor<"int64">>()
    expectTypeOf(Tensor.from(new Uint8Array(1))).toEqualTypeOf<Tensor<"uint8">>()
    expectTypeOf(Tensor.from([1], "int32")).toEqualTypeOf<Tensor<"int32">>()
    expectTypeOf(Tensor.from(Tensor.zeros([1], "int8"))).toEqualTypeOf<Tensor<"int8">>()
    expectTypeOf(Tensor.from([1], "int64").item()).toEqualTypeOf<bigint>()
    expectTypeOf(Tensor.from([1]).data).toEqualTypeOf<Float32Array>()
  })

  it("makes 0-d tensors from scalars", () => {
    const t = Tensor.from(2.5)
    expect(t.shape).toEqual([])
    expect(t.size).toBe(1)
    expect(t.item()).toBe(2.5)
    expect(Tensor.from(3n).item()).toBe(3n)
    expect(Tensor.from(true).item()).toBe(true)
    expect(Tensor.from(4, "int64", [1, 1]).shape).toEqual([1, 1])
  })

  it("maps typed arrays to their dtype and copies them", () => {
    const pairs: Array<[ArrayBufferView, DType.DType]> = [
      [new Float32Array(2), "float32"],
      [new Float64Array(2), "float64"],
      [new BigInt64Array(2), "int64"],
      [new BigUint64Array(2), "uint64"],
      [new Int32Array(2), "int32"],
      [new Int16Array(2), "int16"],
      [new Int8Array(2), "int8"],
      [new Uint32Array(2), "uint32"],
      [new Uint16Array(2), "uint16"],
      [new Uint8Array(2), "uint8"],
      [new Uint8ClampedArray(2), "uint8"]
    ]
    for (const [a, d] of pairs) expect(Tensor.from(a as Float32Array).dtype).toBe(d)
    const src = new Float32Array([1, 2, 3, 4, 5, 6])
    const t = Tensor.from(src, undefined, [2, 3])
    expect(t.shape).toEqual([2, 3])
    src[0] = 99
    expect(t.get(0, 0)).toBe(1)
    expect(Tensor.from(new Int32Array([7, -7]), "int64").data).toEqual(new BigInt64Array([7n, -7n]))
    // a Buffer's slice() is a view; the copy must not be
    const buf = Buffer.from([1, 2, 3])
    const b = Tensor.from(buf)
    buf[0] = 9
    expect(b.toArray()).toEqual([1, 2, 3])
    expect(b.data.constructor).toBe(Uint8Array)
  })

  it("converts when a dtype is given", () => {
    expect(Tensor.from([1.7, -1.7, 2.5], "int64").toArray()).toEqual([1n, -1n, 2n])
    expect(Tensor.from([1.7, -1.7], "int32").toArray()).toEqual([1, -1])
    expect(Tensor.from([300, -1], "uint8").toArray()).toEqual([44, 255])
    expect(Tensor.from([2n ** 64n + 5n], "int64").toArray()).toEqual([5n])
    expect(Tensor.from([0, 2, NaN], "bool").toArray()).toEqual([false, true, true])
    expect(Tensor.from([true, false], "float32").toArray()).toEqual([1, 0])
    expect(Tensor.from([3n], "float64").toArray()).toEqual([3])
    expect(Tensor.from(Tensor.from([1.5, 2.5]), "int64").toArray()).toEqual([1n, 2n])
    expect(Tensor.from([0.1], "float16").data).toEqual(new Uint16Array([0x2e66]))
    expect(caught(() => Tensor.from([NaN], "int64"))).toBeInstanceOf(InvalidTensor)
    expect(caught(() => Tensor.from([Infinity], "int32"))).toBeInstanceOf(InvalidTensor)
    expect(caught(() => Tensor.from(["a"], "float32"))).toBeInstanceOf(InvalidTensor)
  })

  it("rejects ragged arrays with a message that says where", () => {
    const e = caught(() => Tensor.from([[1, 2, 3], [4, 5]]))
    expect(e).toBeInstanceOf(InvalidTensor)
    expect((e as InvalidTensor)._tag).toBe("InvalidTensor")
    expect((e as Error).message).toBe(
      "ragged nested array: expected a sequence of length 3 at [1] (dimension 1), got length 2"
    )
    expect((caught(() => Tensor.from([[1, 2], 3] as never)) as Error).message).toContain("got a scalar")
    expect((caught(() => Tensor.from([1, [2]] as never)) as Error).message).toContain("expected a scalar at [1]")
    expect((caught(() => Tensor.from([1, undefined] as never)) as Error).message).toContain("invalid element at [1]")
    expect(caught(() => Tensor.from([1, "a"]))).toBeInstanceOf(InvalidTensor)
  })

  it("rejects shapes that do not fit the data", () => {
    expect((caught(() => Tensor.from([1, 2, 3], "float32", [2, 2])) as Error).message).toBe(
      "shape [2, 2] needs 4 elements, the value has 3"
    )
    expect(caught(() => Tensor.from(new Float32Array(5), undefined, [2, 3]))).toBeInstanceOf(InvalidTensor)
    expect(caught(() => Tensor.from([1], "float32", [-1]))).toBeInstanceOf(InvalidTensor)
    expect(caught(() => new Tensor("float32", [2], new Float32Array(3)))).toBeInstanceOf(InvalidTensor)
    expect(caught(() => new Tensor("float32", [2], new Float64Array(2) as never))).toBeInstanceOf(InvalidTensor)
    expect(caught(() => Tensor.from([1], "float8" as never))).toBeInstanceOf(InvalidTensor)
  })

  test.prop([tensorArb()], { numRuns: 300 })("Tensor.from(t.toArray(), t.dtype) equals t", (t) => {
    // like torch's tolist, nested arrays cannot spell trailing dims after a 0
    const back = t.size === 0 ? Tensor.from(t.toArray(), t.dtype, t.shape) : Tensor.from(t.toArray(), t.dtype)
    expect(back.equals(t)).toBe(true)
    expect(back.shape).toEqual(t.shape)
    if (t.size > 0 && (t.dtype === "float32" || t.dtype === "int64" || t.dtype === "bool" || t.dtype === "string")) {
      expect(Tensor.from(t.toArray()).dtype).toBe(t.dtype)
    }
  })

  test.prop([tensorArb()])("Tensor.from(t) copies", (t) => {
    const c = Tensor.from(t)
    expect(c.equals(t)).toBe(true)
    expect(c.data).not.toBe(t.data)
  })
})

describe("constructors", () => {
  it("zeros, full, arange", () => {
    expect(Tensor.zeros([2, 3]).toArray()).toEqual([[0, 0, 0], [0, 0, 0]])
    expect(Tensor.zeros([2], "int64").toArray()).toEqual([0n, 0n])
    expect(Tensor.zeros([1], "bool").toArray()).toEqual([false])
    expect(Tensor.full([2], 0.5).toArray()).toEqual([0.5, 0.5])
    expect(Tensor.full([2], 7, "int64").toArray()).toEqual([7n, 7n])
    expect(Tensor.full([2], true).dtype).toBe("bool")
    expect(Tensor.full([], 3n).toArray()).toEqual(3n)
    expect(Tensor.arange(4).toArray()).toEqual([0n, 1n, 2n, 3n])
    expect(Tensor.arange(3, "float32").toArray()).toEqual([0, 1, 2])
    expect(caught(() => Tensor.arange(-1))).toBeInstanceOf(InvalidTensor)
  })
})

describe("float16", () => {
  it("every non-NaN half survives number -> half", () => {
    const bits = new Uint16Array(65536).map((_, i) => i)
    const all = new Tensor("float16", [65536], bits)
    const back = Tensor.from(all.toNumbers(), "float16")
    const wrong: Array<number> = []
    for (let h = 0; h < 65536; h++) {
      const nan = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0
      if (!nan && back.data[h] !== h) wrong.push(h)
    }
    expect(wrong).toEqual([])
  })

  it("rounds to nearest even straight from the double", () => {
    const h = (x: number) => Tensor.from([x], "float16").data[0]
    expect(h(1 + 2 ** -11)).toBe(0x3c00)
    expect(h(1 + 3 * 2 ** -11)).toBe(0x3c02)
    expect(h(65504)).toBe(0x7bff)
    expect(h(65519.99)).toBe(0x7bff)
    expect(h(65520)).toBe(0x7c00)
    expect(h(-Infinity)).toBe(0xfc00)
    expect(h(2 ** -25)).toBe(0)
    expect(h(3 * 2 ** -25)).toBe(2)
    expect(h(-0)).toBe(0x8000)
    expect(h(2 ** -14 - 2 ** -26)).toBe(0x0400)
    expect(Number.isNaN(new Tensor("float16", [], Uint16Array.of(h(NaN))).item())).toBe(true)
  })
})

describe("reading", () => {
  const m = Tensor.arange(12, "int32").reshape(3, 4)

  it("item, get", () => {
    expect(m.get(1, 2)).toBe(6)
    expect(m.get(-1, -1)).toBe(11)
    expect(Tensor.from([[true]]).item()).toBe(true)
    expect((caught(() => m.item()) as Error).message).toBe("a Tensor with 12 elements cannot be converted to a scalar")
    expect(caught(() => m.get(3, 0))).toBeInstanceOf(Index.IndexOutOfRange)
    expect(caught(() => m.get(0))).toBeInstanceOf(InvalidTensor)
    expect(caught(() => m.get(0.5, 0))).toBeInstanceOf(Index.InvalidIndex)
  })

  it("at follows PyTorch basic indexing", () => {
    expect(m.at(1).toArray()).toEqual([4, 5, 6, 7])
    expect(m.at(":", -1).toArray()).toEqual([3, 7, 11])
    expect(m.at("...", "1:3").toArray()).toEqual([[1, 2], [5, 6], [9, 10]])
    expect(m.at("::2", "::-2").toArray()).toEqual([[3, 1], [11, 9]])
    expect(m.at(null, 0).shape).toEqual([1, 4])
    expect(m.at(0, 0).shape).toEqual([])
    expect(m.at(0, 0).item()).toBe(0)
    expect(m.at("5:").shape).toEqual([0, 4])
    expect(m.at({ start: 1 }, { stop: 1 }).toArray()).toEqual([[4], [8]])
    expect(m.at().equals(m)).toBe(true)
    expect(m.at().data).not.toBe(m.data)
    const e = caught(() => m.at(0, 4))
    expect(e).toBeInstanceOf(Index.IndexOutOfRange)
    expect((e as Error).message).toBe("index 4 is out of bounds for dimension 1 with size 4")
    expect(caught(() => m.at(0, 0, 0))).toBeInstanceOf(Index.TooManyIndices)
    expect(caught(() => m.at("1:2:0"))).toBeInstanceOf(Index.InvalidIndex)
  })

  // mostly non-empty dims and about as many items as dims, so most cases index
  // something (the rest exercise the errors)
  const dimArb = fc.oneof({ arbitrary: fc.integer({ min: 1, max: 4 }), weight: 5 }, { arbitrary: fc.constant(0), weight: 1 })
  const indexedArb = tensorArb(DType.all, fc.array(dimArb, { maxLength: 4 })).chain((t) =>
    fc.tuple(fc.constant(t), fc.array(itemArb, { maxLength: t.rank + 1 }))
  )

  test.prop([indexedArb], { numRuns: 1000 })("at equals a naive coordinate-by-coordinate reference", ([t, items]) => {
    const want = naiveAt(t, items)
    if (typeof want === "string") {
      expect(caught(() => t.at(...items))).toMatchObject({ _tag: want })
      return
    }
    const got = t.at(...items)
    expect(got.dtype).toBe(t.dtype)
    expect(got.shape).toEqual(want.shape)
    expect(got.size === 0 ? [] : flatElements(got)).toEqual(want.values)
  })

  it("toArray, toNumbers", () => {
    expect(Tensor.from([[1, 2]], "int64").toArray()).toEqual([[1n, 2n]])
    expect(Tensor.from([[1, 2]], "int64").toNumbers()).toEqual([1, 2])
    expect(Tensor.from([true, false]).toNumbers()).toEqual([1, 0])
    expect(Tensor.from(5).toArray()).toBe(5)
    expect(caught(() => Tensor.from(["x"]).toNumbers())).toBeInstanceOf(InvalidTensor)
  })

  it("reshape", () => {
    const t = Tensor.arange(6)
    expect(t.reshape(2, -1).shape).toEqual([2, 3])
    expect(t.reshape([3, 2]).toArray()).toEqual([[0n, 1n], [2n, 3n], [4n, 5n]])
    expect(t.reshape(-1).shape).toEqual([6])
    expect(Tensor.from([7]).reshape([]).shape).toEqual([])
    expect(caught(() => t.reshape(4, -1))).toBeInstanceOf(InvalidTensor)
    expect(caught(() => t.reshape(-1, -1))).toBeInstanceOf(InvalidTensor)
    expect((caught(() => t.reshape(4, 2)) as Error).message).toBe("shape [4, 2] is invalid for a tensor of 6 elements")
  })

  it("equals, allClose", () => {
    const a = Tensor.from([1, 2, 3])
    expect(a.equals(Tensor.from([1, 2, 3]))).toBe(true)
    expect(a.equals(Tensor.from([1, 2, 3], "float64"))).toBe(false)
    expect(a.equals(Tensor.from([[1, 2, 3]]))).toBe(false)
    expect(Tensor.from([NaN]).equals(Tensor.from([NaN]))).toBe(false)
    expect(Tensor.from([0]).equals(Tensor.from([-0]))).toBe(true)
    expect(a.allClose(Tensor.from([1, 2, 3.00001]))).toBe(true)
    expect(a.allClose(Tensor.from([1, 2, 3.001]))).toBe(false)
    expect(a.allClose(Tensor.from([1.001, 2, 3]), 0, 0.01)).toBe(true)
    expect(a.allClose(Tensor.from([1, 2, 3], "int64"))).toBe(true)
    expect(Tensor.from([Infinity]).allClose(Tensor.from([Infinity]))).toBe(true)
    expect(Tensor.from([NaN]).allClose(Tensor.from([NaN]))).toBe(false)
    expect(caught(() => a.allClose(Tensor.from([1, 2])))).toBeInstanceOf(InvalidTensor)
  })

  it("argmax, softmax", () => {
    expect(Tensor.from([[1, 9], [9, 3]]).argmax()).toBe(1)
    expect(Tensor.from([3n, -1n, 7n]).argmax()).toBe(2)
    expect(Tensor.from([1, NaN, 9]).argmax()).toBe(1)
    expect(caught(() => Tensor.zeros([0]).argmax())).toBeInstanceOf(InvalidTensor)
    const s = Tensor.from([[1, 2, 3], [0, 0, 1000]]).softmax()
    expect(s.dtype).toBe("float32")
    // torch.tensor([[1., 2., 3.], [0., 0., 1000.]]).softmax(-1)
    expect(s.allClose(Tensor.from([[0.0900, 0.2447, 0.6652], [0, 0, 1]]), 0, 1e-4)).toBe(true)
    const c = Tensor.from([[1, 2], [3, 5]], "float64").softmax(0)
    expect(c.allClose(Tensor.from([[0.1192, 0.0474], [0.8808, 0.9526]], "float64"), 0, 1e-4)).toBe(true)
    expect(caught(() => Tensor.arange(3).softmax())).toBeInstanceOf(InvalidTensor)
    expect(caught(() => Tensor.from([1]).softmax(1))).toBeInstanceOf(InvalidTensor)
  })
})

describe("onnxruntime", () => {
  test.prop([tensorArb()], { numRuns: 200 })("fromOrt(toOrt(t)) equals t", (t) => {
    const o = t.toOrt()
    expect(o.type).toBe(t.dtype)
    expect(o.dims).toEqual(t.shape)
    const back = Tensor.fromOrt(o)
    expect(back.equals(t)).toBe(true)
    expect(back.shape).toEqual(t.shape)
  })

  it("toOrt shares storage; fromOrt copies", () => {
    const t = Tensor.from([1, 2, 3])
    const o = t.toOrt()
    expect(o.data).toBe(t.data)
    const back = Tensor.fromOrt(o)
    ;(o.data as Float32Array)[0] = 42
    expect(back.get(0)).toBe(1)
  })

  it("reads ORT bool tensors (bytes) as booleans", () => {
    const o = new ort.Tensor("bool", [true, false, true], [3])
    const t = Tensor.fromOrt(o)
    expect(t.dtype).toBe("bool")
    expect(t.toArray()).toEqual([true, false, true])
    expect(Tensor.from([[false, true]]).toOrt().data).toEqual(new Uint8Array([0, 1]))
  })

  it("feeds and reads a real session", async () => {
    // onnx.helper: inputs f32, i64, b (bool), f16, u8 of shape [n]; each
    // Identity'd to <name>_out, plus f32_twice = Add(f32, f32); opset 17
    const model = Buffer.from(
      "080812003a8b030a180a0366333212076633325f6f757422084964656e746974790a180a0369363412076936345f6f75" +
        "7422084964656e746974790a140a01621205625f6f757422084964656e746974790a180a0366313612076631365f6f75" +
        "7422084964656e746974790a160a027538120675385f6f757422084964656e746974790a1a0a036633320a0366333212" +
        "096633325f747769636522034164641201675a120a03663332120b0a09080112050a0312016e5a120a03693634120b0a" +
        "09080712050a0312016e5a100a0162120b0a09080912050a0312016e5a120a03663136120b0a09080a12050a0312016e" +
        "5a110a027538120b0a09080212050a0312016e62160a076633325f6f7574120b0a09080112050a0312016e62160a0769" +
        "36345f6f7574120b0a09080712050a0312016e62140a05625f6f7574120b0a09080912050a0312016e62160a07663136" +
        "5f6f7574120b0a09080a12050a0312016e62150a0675385f6f7574120b0a09080212050a0312016e62180a096633325f" +
        "7477696365120b0a09080112050a0312016e42040a001011",
      "hex"
    )
    const session = await ort.InferenceSession.create(model)
    try {
      const feeds = {
        f32: Tensor.from([1.5, -2]),
        i64: Tensor.from([3n, -4n]),
        b: Tensor.from([true, false]),
        f16: Tensor.from([0.5, -65504], "float16"),
        u8: Tensor.from([0, 255], "uint8")
      }
      const out = await session.run(Object.fromEntries(Object.entries(feeds).map(([k, t]) => [k, t.toOrt()])))
      for (const [k, t] of Object.entries(feeds)) expect(Tensor.fromOrt(out[`${k}_out`]).equals(t)).toBe(true)
      expect(Tensor.fromOrt(out.f32_twice).toArray()).toEqual([3, -4])
      expect(Tensor.fromOrt(out.b_out).toArray()).toEqual([true, false])
    } finally {
      await session.release()
    }
  })
})

describe("printing like torch", () => {
  // Expected strings are torch 1.13's print() output, pasted verbatim. nnsight-ts
  // names dtypes as onnxruntime does, so its suffix reads dtype=float64 where
  // torch writes dtype=torch.float64; `torchOutput` applies exactly that rename.
  const torchOutput = (s: string) => s.replace(/dtype=torch\./g, "dtype=")
  const cases: ReadonlyArray<readonly [string, () => Tensor, string]> = [
  [
    "torch.tensor([[0.1, -2.0], [3.0, 4.0]])",
    () => Tensor.from([[0.1, -2.0], [3.0, 4.0]]),
    `tensor([[ 0.1000, -2.0000],
        [ 3.0000,  4.0000]])`
  ],
  [
    "torch.tensor([1, -20, 300])",
    () => Tensor.from([1n, -20n, 300n]),
    `tensor([  1, -20, 300])`
  ],
  [
    "torch.tensor([[True, False], [False, True]])",
    () => Tensor.from([[true, false], [false, true]]),
    `tensor([[ True, False],
        [False,  True]])`
  ],
  [
    "torch.tensor([1.5, 2.25, -3.125], dtype=torch.float64)",
    () => Tensor.from([1.5, 2.25, -3.125], "float64"),
    `tensor([ 1.5000,  2.2500, -3.1250], dtype=torch.float64)`
  ],
  [
    "torch.tensor(3.5)",
    () => Tensor.from(3.5),
    `tensor(3.5000)`
  ],
  [
    "torch.tensor(7)",
    () => Tensor.from(7n),
    `tensor(7)`
  ],
  [
    "torch.tensor(3.)",
    () => Tensor.from(3),
    `tensor(3.)`
  ],
  [
    "torch.arange(2000, dtype=torch.float32).reshape(40, 50)",
    () => Tensor.arange(2000, "float32").reshape(40, 50),
    `tensor([[0.0000e+00, 1.0000e+00, 2.0000e+00,  ..., 4.7000e+01, 4.8000e+01,
         4.9000e+01],
        [5.0000e+01, 5.1000e+01, 5.2000e+01,  ..., 9.7000e+01, 9.8000e+01,
         9.9000e+01],
        [1.0000e+02, 1.0100e+02, 1.0200e+02,  ..., 1.4700e+02, 1.4800e+02,
         1.4900e+02],
        ...,
        [1.8500e+03, 1.8510e+03, 1.8520e+03,  ..., 1.8970e+03, 1.8980e+03,
         1.8990e+03],
        [1.9000e+03, 1.9010e+03, 1.9020e+03,  ..., 1.9470e+03, 1.9480e+03,
         1.9490e+03],
        [1.9500e+03, 1.9510e+03, 1.9520e+03,  ..., 1.9970e+03, 1.9980e+03,
         1.9990e+03]])`
  ],
  [
    "torch.arange(2000).reshape(2, 1000)",
    () => Tensor.arange(2000).reshape(2, 1000),
    `tensor([[   0,    1,    2,  ...,  997,  998,  999],
        [1000, 1001, 1002,  ..., 1997, 1998, 1999]])`
  ],
  [
    "torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) - 11.5",
    () => map(Tensor.arange(24, "float32").reshape(2, 3, 4), (x) => x - 11.5),
    `tensor([[[-11.5000, -10.5000,  -9.5000,  -8.5000],
         [ -7.5000,  -6.5000,  -5.5000,  -4.5000],
         [ -3.5000,  -2.5000,  -1.5000,  -0.5000]],

        [[  0.5000,   1.5000,   2.5000,   3.5000],
         [  4.5000,   5.5000,   6.5000,   7.5000],
         [  8.5000,   9.5000,  10.5000,  11.5000]]])`
  ],
  [
    "torch.tensor([-1., -0.5, 2.])",
    () => Tensor.from([-1, -0.5, 2]),
    `tensor([-1.0000, -0.5000,  2.0000])`
  ],
  [
    "torch.tensor([1e-5, 1.0, 123456.0])",
    () => Tensor.from([1e-5, 1.0, 123456.0]),
    `tensor([1.0000e-05, 1.0000e+00, 1.2346e+05])`
  ],
  [
    "torch.tensor([1e9, 2.0])",
    () => Tensor.from([1e9, 2.0]),
    `tensor([1.0000e+09, 2.0000e+00])`
  ],
  [
    "torch.tensor([[1e-10, -2e-3], [5.0, 0.0]])",
    () => Tensor.from([[1e-10, -2e-3], [5.0, 0.0]]),
    `tensor([[ 1.0000e-10, -2.0000e-03],
        [ 5.0000e+00,  0.0000e+00]])`
  ],
  [
    "torch.tensor([123456789.0, 1.0])",
    () => Tensor.from([123456789.0, 1.0]),
    `tensor([1.2346e+08, 1.0000e+00])`
  ],
  [
    "torch.tensor([[1.0e8, 1.0], [2.0, 3.0]])",
    () => Tensor.from([[1.0e8, 1.0], [2.0, 3.0]]),
    `tensor([[1.0000e+08, 1.0000e+00],
        [2.0000e+00, 3.0000e+00]])`
  ],
  [
    "torch.tensor([1., 2., 3.])",
    () => Tensor.from([1, 2, 3]),
    `tensor([1., 2., 3.])`
  ],
  [
    "torch.zeros(2, 2)",
    () => Tensor.zeros([2, 2]),
    `tensor([[0., 0.],
        [0., 0.]])`
  ],
  [
    "torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)",
    () => Tensor.from([[1, 2], [3, 4]], "int32"),
    `tensor([[1, 2],
        [3, 4]], dtype=torch.int32)`
  ],
  [
    "torch.tensor([0, 255, 7], dtype=torch.uint8)",
    () => Tensor.from([0, 255, 7], "uint8"),
    `tensor([  0, 255,   7], dtype=torch.uint8)`
  ],
  [
    "torch.tensor([[-128, 5], [7, 127]], dtype=torch.int8)",
    () => Tensor.from([[-128, 5], [7, 127]], "int8"),
    `tensor([[-128,    5],
        [   7,  127]], dtype=torch.int8)`
  ],
  [
    "torch.tensor([0.1, 2.5, -1.0], dtype=torch.float16)",
    () => Tensor.from([0.1, 2.5, -1.0], "float16"),
    `tensor([ 0.1000,  2.5000, -1.0000], dtype=torch.float16)`
  ],
  [
    "torch.arange(30, dtype=torch.float32) / 7",
    () => map(Tensor.arange(30, "float32"), (x) => x / 7),
    `tensor([0.0000, 0.1429, 0.2857, 0.4286, 0.5714, 0.7143, 0.8571, 1.0000, 1.1429,
        1.2857, 1.4286, 1.5714, 1.7143, 1.8571, 2.0000, 2.1429, 2.2857, 2.4286,
        2.5714, 2.7143, 2.8571, 3.0000, 3.1429, 3.2857, 3.4286, 3.5714, 3.7143,
        3.8571, 4.0000, 4.1429])`
  ],
  [
    "torch.arange(40) * 1000",
    () => Tensor.from(Tensor.arange(40).toNumbers().map((x) => x * 1000), "int64"),
    `tensor([    0,  1000,  2000,  3000,  4000,  5000,  6000,  7000,  8000,  9000,
        10000, 11000, 12000, 13000, 14000, 15000, 16000, 17000, 18000, 19000,
        20000, 21000, 22000, 23000, 24000, 25000, 26000, 27000, 28000, 29000,
        30000, 31000, 32000, 33000, 34000, 35000, 36000, 37000, 38000, 39000])`
  ],
  [
    "torch.arange(19, dtype=torch.float64) * 1000.5",
    () => map(Tensor.arange(19, "float64"), (x) => x * 1000.5),
    `tensor([    0.0000,  1000.5000,  2001.0000,  3001.5000,  4002.0000,  5002.5000,
         6003.0000,  7003.5000,  8004.0000,  9004.5000, 10005.0000, 11005.5000,
        12006.0000, 13006.5000, 14007.0000, 15007.5000, 16008.0000, 17008.5000,
        18009.0000], dtype=torch.float64)`
  ],
  [
    "torch.tensor([float('nan'), float('inf'), -float('inf'), 1.5])",
    () => Tensor.from([NaN, Infinity, -Infinity, 1.5]),
    `tensor([   nan,    inf,   -inf, 1.5000])`
  ],
  [
    "torch.tensor([float('nan'), 2.0, 0.0])",
    () => Tensor.from([NaN, 2.0, 0.0]),
    `tensor([nan, 2., 0.])`
  ],
  [
    "torch.tensor([-0.0, 1.0])",
    () => Tensor.from([-0, 1]),
    `tensor([-0., 1.])`
  ],
  [
    "torch.tensor([0.03125, 1.03125], dtype=torch.float64)",
    () => Tensor.from([0.03125, 1.03125], "float64"),
    `tensor([0.0312, 1.0312], dtype=torch.float64)`
  ],
  [
    "torch.tensor([1.03125e-5, 1.0], dtype=torch.float64)",
    () => Tensor.from([1.03125e-5, 1.0], "float64"),
    `tensor([1.0312e-05, 1.0000e+00], dtype=torch.float64)`
  ],
  [
    "torch.zeros(0)",
    () => Tensor.zeros([0]),
    `tensor([])`
  ],
  [
    "torch.zeros(0, 3, dtype=torch.int64)",
    () => Tensor.zeros([0, 3], "int64"),
    `tensor([], size=(0, 3), dtype=torch.int64)`
  ],
  [
    "torch.zeros(2, 0, dtype=torch.float64)",
    () => Tensor.zeros([2, 0], "float64"),
    `tensor([], size=(2, 0), dtype=torch.float64)`
  ],
  [
    "torch.arange(1200, dtype=torch.float64).reshape(2, 600)",
    () => Tensor.arange(1200, "float64").reshape(2, 600),
    `tensor([[0.0000e+00, 1.0000e+00, 2.0000e+00,  ..., 5.9700e+02, 5.9800e+02,
         5.9900e+02],
        [6.0000e+02, 6.0100e+02, 6.0200e+02,  ..., 1.1970e+03, 1.1980e+03,
         1.1990e+03]], dtype=torch.float64)`
  ],
  [
    "torch.arange(1200, dtype=torch.float32).reshape(10, 2, 60) / 3",
    () => map(Tensor.arange(1200, "float32").reshape(10, 2, 60), (x) => x / 3),
    `tensor([[[0.0000e+00, 3.3333e-01, 6.6667e-01,  ..., 1.9000e+01,
          1.9333e+01, 1.9667e+01],
         [2.0000e+01, 2.0333e+01, 2.0667e+01,  ..., 3.9000e+01,
          3.9333e+01, 3.9667e+01]],

        [[4.0000e+01, 4.0333e+01, 4.0667e+01,  ..., 5.9000e+01,
          5.9333e+01, 5.9667e+01],
         [6.0000e+01, 6.0333e+01, 6.0667e+01,  ..., 7.9000e+01,
          7.9333e+01, 7.9667e+01]],

        [[8.0000e+01, 8.0333e+01, 8.0667e+01,  ..., 9.9000e+01,
          9.9333e+01, 9.9667e+01],
         [1.0000e+02, 1.0033e+02, 1.0067e+02,  ..., 1.1900e+02,
          1.1933e+02, 1.1967e+02]],

        ...,

        [[2.8000e+02, 2.8033e+02, 2.8067e+02,  ..., 2.9900e+02,
          2.9933e+02, 2.9967e+02],
         [3.0000e+02, 3.0033e+02, 3.0067e+02,  ..., 3.1900e+02,
          3.1933e+02, 3.1967e+02]],

        [[3.2000e+02, 3.2033e+02, 3.2067e+02,  ..., 3.3900e+02,
          3.3933e+02, 3.3967e+02],
         [3.4000e+02, 3.4033e+02, 3.4067e+02,  ..., 3.5900e+02,
          3.5933e+02, 3.5967e+02]],

        [[3.6000e+02, 3.6033e+02, 3.6067e+02,  ..., 3.7900e+02,
          3.7933e+02, 3.7967e+02],
         [3.8000e+02, 3.8033e+02, 3.8067e+02,  ..., 3.9900e+02,
          3.9933e+02, 3.9967e+02]]])`
  ]
]

  it.each(cases)("%s", (_python, make, expected) => {
    expect(make().toString()).toBe(torchOutput(expected))
  })

  it("console.log prints the same", () => {
    const t = Tensor.from([[0.1, -2], [3, 4]])
    expect(inspect(t)).toBe(t.toString())
    expect(String(t)).toBe(t.toString())
  })

  it("puts a dtype suffix that would pass 80 columns on its own line", () => {
    // torch.arange(6, dtype=torch.float64) * 1000.5
    const t = map(Tensor.arange(6, "float64"), (x) => x * 1000.5)
    expect(t.toString()).toBe(
      torchOutput("tensor([   0.0000, 1000.5000, 2001.0000, 3001.5000, 4002.0000, 5002.5000],\n       dtype=torch.float64)")
    )
    // torch.arange(3, dtype=torch.int32).reshape(3, 1) * 1000000
    expect(map(Tensor.arange(3, "int32").reshape(3, 1), (x) => x * 1e6).toString()).toBe(
      torchOutput("tensor([[      0],\n        [1000000],\n        [2000000]], dtype=torch.int32)")
    )
  })
})
