/**
 * Python / PyTorch basic indexing as data: integers, slices (`"1:3"`, `"::2"`,
 * `"-3:"`), the ellipsis (`"..."`) and new axes (`null`, Python's `None`).
 *
 * Indexing goes through three plain-data stages so that the eager `Tensor` and
 * the intervention graph share one definition: `parse` checks the user's items
 * without a shape, `resolve` fixes them against a concrete shape (wrapping,
 * clamping, bounds checks), and `toOnnxSlice` describes the result as ONNX
 * Slice / Squeeze / Unsqueeze parameters.
 *
 * @example
 * import { Index } from "nnsight-ts"
 * const specs = Index.parse([":", -1])
 * const r = Index.resolve(specs, [2, 5, 8])
 * r.shape                // [2, 8]
 * Index.toOnnxSlice(r)   // { starts: [4], ends: [5], axes: [1], steps: [1], squeezeAxes: [1], unsqueezeAxes: [] }
 *
 * @since 0.1.0
 */
import { Data } from "effect"

/**
 * A Python-style slice written as an object; absent bounds mean "from the
 * start" / "to the end", as in Python's `slice(start, stop, step)`.
 *
 * @example
 * const s: Index.SliceObject = { start: 1, stop: -1 } // same as "1:-1"
 *
 * @since 0.1.0
 */
export interface SliceObject {
  readonly start?: number | null
  readonly stop?: number | null
  readonly step?: number | null
}

/**
 * One index item, as users write it: an integer, a slice string (`":"`,
 * `"a:b"`, `"a:b:c"`, `"::2"`, `"-3:"`), `"..."`, `null` for a new axis, or a
 * slice object. Integer strings (`"-1"`) are integers.
 *
 * @example
 * const items: ReadonlyArray<Index.Item> = [0, "...", null, "1:3"]
 *
 * @since 0.1.0
 */
export type Item = number | string | null | SliceObject

/**
 * One parsed index item. Slice bounds stay unresolved (`undefined` = open)
 * because their meaning depends on the dimension's size and the step's sign.
 *
 * @example
 * Index.parse(["::2"]) // [{ _tag: "Slice", step: 2 }]
 *
 * @since 0.1.0
 */
export type Spec =
  | { readonly _tag: "Int"; readonly index: number }
  | { readonly _tag: "Slice"; readonly start?: number; readonly stop?: number; readonly step: number }
  | { readonly _tag: "Ellipsis" }
  | { readonly _tag: "NewAxis" }

/**
 * The selection made in one input dimension: a single position (the dimension
 * is removed) or `count` positions `start, start + step, ...` (the dimension
 * is kept with size `count`). All numbers are non-negative positions except
 * `step`, which may be negative.
 *
 * @example
 * const d: Index.Dim = { _tag: "Range", start: 0, step: 2, count: 3 }
 *
 * @since 0.1.0
 */
export type Dim =
  | { readonly _tag: "Index"; readonly index: number }
  | { readonly _tag: "Range"; readonly start: number; readonly step: number; readonly count: number }

/**
 * Index items fixed against a concrete shape.
 *
 * @example
 * const r: Index.Resolved = Index.resolve(Index.parse([0, null]), [3, 4])
 * r.dims    // [{ _tag: "Index", index: 0 }, { _tag: "Range", start: 0, step: 1, count: 4 }]
 * r.shape   // [1, 4]
 * r.newAxes // [0]
 *
 * @since 0.1.0
 */
export interface Resolved {
  /** The shape that was indexed. */
  readonly input: ReadonlyArray<number>
  /** One selection per input dimension, in order. */
  readonly dims: ReadonlyArray<Dim>
  /** The result's shape. */
  readonly shape: ReadonlyArray<number>
  /** Positions in `shape` of the size-1 axes that `null` inserted, ascending. */
  readonly newAxes: ReadonlyArray<number>
}

/**
 * An index item that cannot be parsed: a malformed string, a non-integer, a
 * zero step, or a second ellipsis.
 *
 * @example
 * try { Index.parse(["1:2:0"]) } catch (e) { (e as Index.InvalidIndex)._tag } // "InvalidIndex"
 *
 * @since 0.1.0
 */
export class InvalidIndex extends Data.TaggedError("InvalidIndex")<{
  readonly item: unknown
  readonly message: string
}> {}

/**
 * An integer index outside its dimension.
 *
 * @example
 * try { Index.resolve(Index.parse([5]), [2]) } catch (e) { (e as Index.IndexOutOfRange).message }
 * // "index 5 is out of bounds for dimension 0 with size 2"
 *
 * @since 0.1.0
 */
export class IndexOutOfRange extends Data.TaggedError("IndexOutOfRange")<{
  readonly index: number
  readonly dim: number
  readonly size: number
  readonly message: string
}> {}

/**
 * More integer/slice items than the tensor has dimensions.
 *
 * @example
 * try { Index.resolve(Index.parse([0, 0]), [3]) } catch (e) { (e as Index.TooManyIndices).message }
 * // "too many indices for tensor of dimension 1 (got 2)"
 *
 * @since 0.1.0
 */
export class TooManyIndices extends Data.TaggedError("TooManyIndices")<{
  readonly given: number
  readonly rank: number
  readonly message: string
}> {}

/**
 * Errors of `parse` and `resolve`.
 *
 * @since 0.1.0
 */
export type IndexError = InvalidIndex | IndexOutOfRange | TooManyIndices

const show = (item: unknown): string => {
  if (typeof item === "string") return JSON.stringify(item)
  if (item === undefined) return "undefined"
  try {
    return JSON.stringify(item) ?? String(item)
  } catch {
    return String(item)
  }
}

const integerPattern = /^[+-]?\d+$/

const parseInteger = (text: string, item: unknown): number => {
  const t = text.trim()
  if (!integerPattern.test(t)) {
    throw new InvalidIndex({ item, message: `invalid index ${show(item)}: ${JSON.stringify(t)} is not an integer` })
  }
  const n = Number(t)
  if (!Number.isSafeInteger(n)) {
    throw new InvalidIndex({ item, message: `invalid index ${show(item)}: ${t} is too large` })
  }
  // "-0" must not survive as -0: it would print as "0" but compare oddly
  return n === 0 ? 0 : n
}

const checkInteger = (n: unknown, item: unknown, what: string): number => {
  if (typeof n !== "number" || !Number.isSafeInteger(n)) {
    throw new InvalidIndex({ item, message: `invalid index ${show(item)}: ${what} must be an integer, got ${show(n)}` })
  }
  return n === 0 ? 0 : n
}

const makeSlice = (item: unknown, start: number | undefined, stop: number | undefined, step: number): Spec => {
  if (step === 0) throw new InvalidIndex({ item, message: `invalid index ${show(item)}: slice step cannot be zero` })
  return {
    _tag: "Slice",
    ...(start === undefined ? {} : { start }),
    ...(stop === undefined ? {} : { stop }),
    step
  }
}

const parseString = (item: string): Spec => {
  const t = item.trim()
  if (t === "...") return { _tag: "Ellipsis" }
  if (!t.includes(":")) return { _tag: "Int", index: parseInteger(t, item) }
  const parts = t.split(":")
  if (parts.length > 3) {
    throw new InvalidIndex({ item, message: `invalid index ${show(item)}: a slice has at most two ':'` })
  }
  const bound = (p: string | undefined) => (p === undefined || p.trim() === "" ? undefined : parseInteger(p, item))
  return makeSlice(item, bound(parts[0]), bound(parts[1]), bound(parts[2]) ?? 1)
}

const parseItem = (item: Item): Spec => {
  if (item === null) return { _tag: "NewAxis" }
  if (typeof item === "number") return { _tag: "Int", index: checkInteger(item, item, "index") }
  if (typeof item === "string") return parseString(item)
  if (Array.isArray(item)) {
    throw new InvalidIndex({ item, message: `invalid index ${show(item)}: indexing with arrays (advanced indexing) is not supported` })
  }
  if (typeof item === "object") {
    const extra = Object.keys(item).filter((k) => k !== "start" && k !== "stop" && k !== "step")
    if (extra.length > 0) {
      throw new InvalidIndex({ item, message: `invalid index ${show(item)}: a slice object has only start, stop and step (got ${extra.join(", ")})` })
    }
    const opt = (v: unknown, what: string) => (v === undefined || v === null ? undefined : checkInteger(v, item, what))
    return makeSlice(item, opt(item.start, "slice start"), opt(item.stop, "slice stop"), opt(item.step, "slice step") ?? 1)
  }
  throw new InvalidIndex({ item, message: `invalid index ${show(item)}: expected an integer, a slice string, "..." or null` })
}

/**
 * Parses index items. Throws `InvalidIndex` for malformed strings,
 * non-integers, zero steps and more than one ellipsis.
 *
 * Unlike PyTorch (but like Python and NumPy) negative steps are accepted:
 * `"::-1"` reverses a dimension.
 *
 * @example
 * Index.parse([0, ":", "...", null, "-3:", "::2"])
 * // [{ _tag: "Int", index: 0 }, { _tag: "Slice", step: 1 }, { _tag: "Ellipsis" },
 * //  { _tag: "NewAxis" }, { _tag: "Slice", start: -3, step: 1 }, { _tag: "Slice", step: 2 }]
 *
 * @since 0.1.0
 */
export const parse = (items: ReadonlyArray<Item>): ReadonlyArray<Spec> => {
  const specs = items.map(parseItem)
  if (specs.filter((s) => s._tag === "Ellipsis").length > 1) {
    throw new InvalidIndex({ item: items, message: `invalid index ${show(items)}: an index can only have a single ellipsis ("...")` })
  }
  return specs
}

// Python's slice.indices(n): clamps bounds into the range the step can walk.
const sliceRange = (spec: Extract<Spec, { _tag: "Slice" }>, size: number): Extract<Dim, { _tag: "Range" }> => {
  const step = spec.step
  const [lower, upper] = step > 0 ? [0, size] : [-1, size - 1]
  const bound = (v: number | undefined, dflt: number) => {
    if (v === undefined) return dflt
    const w = v < 0 ? v + size : v
    return w < lower ? lower : w > upper ? upper : w
  }
  const start = bound(spec.start, step > 0 ? lower : upper)
  const stop = bound(spec.stop, step > 0 ? upper : lower)
  const count = step > 0 ? Math.max(0, Math.ceil((stop - start) / step)) : Math.max(0, Math.ceil((start - stop) / -step))
  // An empty range's start is never read; pin it inside the dimension so
  // lowerings never see -1.
  return { _tag: "Range", start: count === 0 ? Math.max(0, Math.min(start, size)) : start, step, count }
}

/**
 * Fixes parsed items against a shape, like PyTorch: integers wrap once when
 * negative and must then lie in `[0, size)` (`IndexOutOfRange` otherwise),
 * slice bounds are clamped, `...` stands for as many `:` as needed, missing
 * trailing items mean `:`. More integer/slice items than dimensions throw
 * `TooManyIndices`.
 *
 * @example
 * const r = Index.resolve(Index.parse([-1, "::2"]), [3, 5])
 * r.dims  // [{ _tag: "Index", index: 2 }, { _tag: "Range", start: 0, step: 2, count: 3 }]
 * r.shape // [3]
 *
 * @since 0.1.0
 */
export const resolve = (specs: ReadonlyArray<Spec>, shape: ReadonlyArray<number>): Resolved => {
  const consuming = specs.filter((s) => s._tag === "Int" || s._tag === "Slice").length
  if (consuming > shape.length) {
    throw new TooManyIndices({
      given: consuming,
      rank: shape.length,
      message: `too many indices for tensor of dimension ${shape.length} (got ${consuming})`
    })
  }
  const full: Spec = { _tag: "Slice", step: 1 }
  const expanded: Array<Spec> = []
  let sawEllipsis = false
  for (const s of specs) {
    if (s._tag === "Ellipsis") {
      if (sawEllipsis) throw new InvalidIndex({ item: specs, message: `an index can only have a single ellipsis ("...")` })
      sawEllipsis = true
      for (let i = 0; i < shape.length - consuming; i++) expanded.push(full)
    } else {
      expanded.push(s)
    }
  }
  if (!sawEllipsis) for (let i = consuming; i < shape.length; i++) expanded.push(full)

  const dims: Array<Dim> = []
  const out: Array<number> = []
  const newAxes: Array<number> = []
  for (const s of expanded) {
    switch (s._tag) {
      case "NewAxis": {
        newAxes.push(out.length)
        out.push(1)
        break
      }
      case "Int": {
        const dim = dims.length
        const size = shape[dim]
        const index = s.index < 0 ? s.index + size : s.index
        if (index < 0 || index >= size) {
          throw new IndexOutOfRange({
            index: s.index,
            dim,
            size,
            message: `index ${s.index} is out of bounds for dimension ${dim} with size ${size}`
          })
        }
        dims.push({ _tag: "Index", index })
        break
      }
      case "Slice": {
        const r = sliceRange(s, shape[dims.length])
        dims.push(r)
        out.push(r.count)
        break
      }
      case "Ellipsis":
        break
    }
  }
  return { input: [...shape], dims, shape: out, newAxes }
}

/**
 * ONNX lowering of a resolved index: one `Slice` (skipped when `axes` is
 * empty), then `Squeeze(squeezeAxes)` of the integer-indexed input axes, then
 * `Unsqueeze(unsqueezeAxes)` for the new axes (positions in the final shape,
 * as ONNX Unsqueeze wants). Full `:` dimensions are left out of the Slice.
 *
 * @since 0.1.0
 */
export interface OnnxSlice {
  readonly starts: ReadonlyArray<number>
  readonly ends: ReadonlyArray<number>
  readonly axes: ReadonlyArray<number>
  readonly steps: ReadonlyArray<number>
  readonly squeezeAxes: ReadonlyArray<number>
  readonly unsqueezeAxes: ReadonlyArray<number>
}

/**
 * Describes a resolved index as ONNX Slice / Squeeze / Unsqueeze parameters
 * (see `OnnxSlice`). Ends are exact (never relying on ONNX clamping) except
 * that a negative-step range reaching position 0 ends at `-(size + 1)`,
 * because ONNX would read an end of `-1` as "the last position".
 *
 * @example
 * Index.toOnnxSlice(Index.resolve(Index.parse(["...", -1, null]), [2, 3]))
 * // { starts: [2], ends: [3], axes: [1], steps: [1], squeezeAxes: [1], unsqueezeAxes: [1] }
 *
 * @since 0.1.0
 */
export const toOnnxSlice = (resolved: Resolved): OnnxSlice => {
  const starts: Array<number> = []
  const ends: Array<number> = []
  const axes: Array<number> = []
  const steps: Array<number> = []
  const squeezeAxes: Array<number> = []
  resolved.dims.forEach((d, axis) => {
    const size = resolved.input[axis]
    if (d._tag === "Index") {
      starts.push(d.index)
      ends.push(d.index + 1)
      axes.push(axis)
      steps.push(1)
      squeezeAxes.push(axis)
      return
    }
    if (d.step === 1 && d.start === 0 && d.count === size) return
    const last = d.start + (d.count - 1) * d.step
    const end = d.count === 0 ? d.start : d.step > 0 ? last + 1 : last - 1 < 0 ? -(size + 1) : last - 1
    starts.push(d.start)
    ends.push(end)
    axes.push(axis)
    steps.push(d.step)
  })
  return { starts, ends, axes, steps, squeezeAxes, unsqueezeAxes: [...resolved.newAxes] }
}

/**
 * Writes parsed items back in Python syntax, for messages and graph printouts.
 *
 * @example
 * Index.format(Index.parse([":", -1, null, "1::2"])) // ":, -1, None, 1::2"
 *
 * @since 0.1.0
 */
export const format = (specs: ReadonlyArray<Spec>): string =>
  specs
    .map((s) => {
      switch (s._tag) {
        case "Int":
          return String(s.index)
        case "Ellipsis":
          return "..."
        case "NewAxis":
          return "None"
        case "Slice": {
          const head = `${s.start ?? ""}:${s.stop ?? ""}`
          return s.step === 1 ? head : `${head}:${s.step}`
        }
      }
    })
    .join(", ")
