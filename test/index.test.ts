import { fc, test } from "@fast-check/vitest"
import { describe, expect, it } from "vitest"
import * as Index from "../src/core/Index.js"

// list(range(n))[start:stop:step] computed by CPython: [n, start, stop, step, result]
const pythonSlices: ReadonlyArray<readonly [number, number | undefined, number | undefined, number, ReadonlyArray<number>]> =
  [[7,5,9,-3,[]],
    [3,2,-3,1,[]],
    [1,-3,2,3,[0]],
    [0,1,2,-1,[]],
    [2,undefined,-4,-1,[1,0]],
    [0,2,undefined,1,[]],
    [7,-3,0,2,[]],
    [7,5,4,1,[]],
    [8,undefined,undefined,-3,[7,4,1]],
    [3,undefined,undefined,-1,[2,1,0]],
    [1,undefined,undefined,3,[0]],
    [1,-3,undefined,1,[0]],
    [0,1,2,3,[]],
    [3,0,undefined,-3,[0]],
    [5,5,-5,1,[]],
    [3,undefined,undefined,-2,[2,0]],
    [7,-3,-3,1,[]],
    [2,-3,-1,3,[0]],
    [0,2,-2,2,[]],
    [3,4,-4,1,[]],
    [0,undefined,undefined,1,[]],
    [5,undefined,undefined,-3,[4,1]],
    [1,-2,undefined,1,[0]],
    [5,-5,0,2,[]],
    [2,-2,-1,-3,[]],
    [3,undefined,3,-2,[]],
    [3,2,1,-2,[2]],
    [0,undefined,0,1,[]],
    [3,-1,4,-2,[]],
    [7,-7,undefined,2,[0,2,4,6]],
    [7,-7,undefined,-1,[0]],
    [3,undefined,undefined,-2,[2,0]],
    [7,undefined,undefined,1,[0,1,2,3,4,5,6]],
    [5,-5,undefined,-1,[0]],
    [2,4,-2,3,[]],
    [0,0,-2,1,[]],
    [0,1,undefined,-1,[]],
    [4,undefined,undefined,2,[0,2]],
    [7,-8,-5,-1,[]],
    [5,undefined,-6,2,[]],
    [6,undefined,-8,-3,[5,2]],
    [6,-6,undefined,3,[0,3]],
    [1,2,2,2,[]],
    [7,8,undefined,3,[]],
    [8,-8,-3,1,[0,1,2,3,4]],
    [1,2,-1,3,[]],
    [0,2,undefined,2,[]],
    [2,3,-1,-3,[]]]

const positions = (d: Index.Dim): Array<number> =>
  d._tag === "Index" ? [d.index] : Array.from({ length: d.count }, (_, k) => d.start + k * d.step)

const caught = (f: () => unknown): unknown => {
  try {
    f()
  } catch (e) {
    return e
  }
  throw new Error("expected a throw")
}

describe("Index.parse", () => {
  it("parses every item form", () => {
    expect(Index.parse([0, -1, "2", ":", "1:3", "::2", "-3:", "1:-1:2", "...", null, { start: 1, stop: 4 }, { step: -1 }])).toEqual([
      { _tag: "Int", index: 0 },
      { _tag: "Int", index: -1 },
      { _tag: "Int", index: 2 },
      { _tag: "Slice", step: 1 },
      { _tag: "Slice", start: 1, stop: 3, step: 1 },
      { _tag: "Slice", step: 2 },
      { _tag: "Slice", start: -3, step: 1 },
      { _tag: "Slice", start: 1, stop: -1, step: 2 },
      { _tag: "Ellipsis" },
      { _tag: "NewAxis" },
      { _tag: "Slice", start: 1, stop: 4, step: 1 },
      { _tag: "Slice", step: -1 }
    ])
  })

  it("tolerates spaces and empty parts", () => {
    expect(Index.parse([" 1 : 3 ", "::", " ... ", "1:"])).toEqual([
      { _tag: "Slice", start: 1, stop: 3, step: 1 },
      { _tag: "Slice", step: 1 },
      { _tag: "Ellipsis" },
      { _tag: "Slice", start: 1, step: 1 }
    ])
  })

  it.each([
    ["a", "is not an integer"],
    ["1.5", "is not an integer"],
    ["1:2:3:4", "at most two ':'"],
    ["::0", "step cannot be zero"],
    ["", "is not an integer"],
    ["1:x", "is not an integer"]
  ])("rejects %j (%s)", (item, message) => {
    const e = caught(() => Index.parse([item]))
    expect(e).toBeInstanceOf(Index.InvalidIndex)
    expect((e as Index.InvalidIndex)._tag).toBe("InvalidIndex")
    expect((e as Error).message).toContain(message)
  })

  it("rejects non-integers, zero steps, arrays, odd objects and two ellipses", () => {
    for (const items of [[1.5], [Number.NaN], [{ step: 0 }], [{ start: 0.5 }], [[0, 1]], [{ begin: 1 }], ["...", "..."], [true]] as const) {
      expect(caught(() => Index.parse(items as never))).toBeInstanceOf(Index.InvalidIndex)
    }
    expect((caught(() => Index.parse(["...", 0, "..."])) as Error).message).toContain("single ellipsis")
  })
})

describe("Index.resolve", () => {
  it.each(pythonSlices)("matches Python: list(range(%i))[%s:%s:%i]", (n, start, stop, step, expected) => {
    const r = Index.resolve(Index.parse([{ start, stop, step }]), [n])
    expect(positions(r.dims[0])).toEqual(expected)
    expect(r.shape).toEqual([expected.length])
    // the same through the string syntax
    const text = `${start ?? ""}:${stop ?? ""}:${step}`
    expect(Index.resolve(Index.parse([text]), [n])).toEqual(r)
  })

  it("expands the ellipsis, fills trailing dims and places new axes", () => {
    const r = Index.resolve(Index.parse([null, "...", -1, null]), [2, 3, 4])
    expect(r.dims).toEqual([
      { _tag: "Range", start: 0, step: 1, count: 2 },
      { _tag: "Range", start: 0, step: 1, count: 3 },
      { _tag: "Index", index: 3 }
    ])
    expect(r.shape).toEqual([1, 2, 3, 1])
    expect(r.newAxes).toEqual([0, 3])
    expect(Index.resolve(Index.parse([1]), [2, 3]).shape).toEqual([3])
    expect(Index.resolve(Index.parse(["..."]), []).shape).toEqual([])
    expect(Index.resolve(Index.parse([null]), []).shape).toEqual([1])
    expect(Index.resolve(Index.parse([0, "..."]), [4]).shape).toEqual([])
  })

  it("reports out-of-range integers with the dim and size", () => {
    const e = caught(() => Index.resolve(Index.parse([0, 5]), [2, 3]))
    expect(e).toBeInstanceOf(Index.IndexOutOfRange)
    expect(e).toMatchObject({ _tag: "IndexOutOfRange", index: 5, dim: 1, size: 3 })
    expect((e as Error).message).toBe("index 5 is out of bounds for dimension 1 with size 3")
    expect(caught(() => Index.resolve(Index.parse([-3]), [2]))).toMatchObject({ index: -3, dim: 0, size: 2 })
    expect(caught(() => Index.resolve(Index.parse(["...", 0]), [2, 0]))).toMatchObject({ dim: 1, size: 0 })
  })

  it("reports too many indices", () => {
    const e = caught(() => Index.resolve(Index.parse([0, ":", 0]), [2, 3]))
    expect(e).toBeInstanceOf(Index.TooManyIndices)
    expect(e).toMatchObject({ _tag: "TooManyIndices", given: 3, rank: 2 })
    expect(caught(() => Index.resolve(Index.parse([0]), []))).toBeInstanceOf(Index.TooManyIndices)
    // new axes and the ellipsis consume nothing
    expect(Index.resolve(Index.parse([null, 0, "...", ":", null]), [2, 3]).shape).toEqual([1, 3, 1])
  })
})

// ONNX Slice as its spec defines it, on one axis: positions it reads.
const onnxSlicePositions = (dim: number, start: number, end: number, step: number): Array<number> => {
  let s = start < 0 ? start + dim : start
  let e = end < 0 ? end + dim : end
  if (step > 0) {
    s = Math.min(Math.max(s, 0), dim)
    e = Math.min(Math.max(e, 0), dim)
  } else {
    s = Math.min(Math.max(s, 0), dim - 1)
    e = Math.min(Math.max(e, -1), dim - 1)
  }
  const out: Array<number> = []
  for (let i = s; step > 0 ? i < e : i > e; i += step) out.push(i)
  return out
}

const shapeArb = fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 4 })
const boundArb = fc.option(fc.integer({ min: -7, max: 7 }), { nil: undefined })
const itemArb: fc.Arbitrary<Index.Item> = fc.oneof(
  fc.integer({ min: -6, max: 6 }),
  fc.constant(null),
  fc.constant("..."),
  fc
    .tuple(boundArb, boundArb, fc.option(fc.integer({ min: -3, max: 3 }).filter((s) => s !== 0), { nil: undefined }))
    .map(([a, b, c]) => (c === undefined ? `${a ?? ""}:${b ?? ""}` : `${a ?? ""}:${b ?? ""}:${c}`)),
  fc.record({ start: boundArb, stop: boundArb, step: fc.integer({ min: 1, max: 3 }) })
)

describe("Index properties", () => {
  test.prop([shapeArb, fc.array(itemArb, { maxLength: 5 })], { numRuns: 500 })(
    "toOnnxSlice reads exactly the resolved positions",
    (shape, items) => {
      let resolved: Index.Resolved
      try {
        resolved = Index.resolve(Index.parse(items), shape)
      } catch {
        return
      }
      const lowered = Index.toOnnxSlice(resolved)
      resolved.dims.forEach((d, axis) => {
        const k = lowered.axes.indexOf(axis)
        const read =
          k < 0
            ? Array.from({ length: shape[axis] }, (_, i) => i)
            : onnxSlicePositions(shape[axis], lowered.starts[k], lowered.ends[k], lowered.steps[k])
        expect(read).toEqual(positions(d))
        expect(lowered.squeezeAxes.includes(axis)).toBe(d._tag === "Index")
      })
      // Slice keeps the rank; Squeeze then Unsqueeze must land on the result shape
      const afterSqueeze = resolved.dims.flatMap((d) => (d._tag === "Index" ? [] : [d.count]))
      const final = [...afterSqueeze]
      for (const a of lowered.unsqueezeAxes) final.splice(a, 0, 1)
      expect(final).toEqual(resolved.shape)
    }
  )

  test.prop([fc.array(itemArb, { maxLength: 6 })])("format writes what parse reads", (items) => {
    let specs: ReadonlyArray<Index.Spec>
    try {
      specs = Index.parse(items)
    } catch {
      return
    }
    const text = Index.format(specs)
    const back = text === "" ? [] : text.split(", ").map((s) => (s === "None" ? null : s))
    expect(Index.parse(back)).toEqual(specs)
  })
})
