/**
 * fast-check arbitraries for property tests of experiments: tensors, shapes,
 * prompts, module paths of a model, positions, and random intervention
 * graphs (trace callbacks) over a given model.
 *
 * @example
 * import { fc } from "@fast-check/vitest"
 * import * as Arb from "nnsight-ts/testing"
 * fc.assert(fc.asyncProperty(Arb.modulePath(model.tree), async (path) => {
 *   const { out } = await model.trace(prompt, (m) => ({ out: Arb.envoyAt(m, path).output }))
 *   return out.shape.length === 3
 * }))
 *
 * @since 0.1.0
 */
import fc from "fast-check"
import type * as DType from "./core/DType.js"
import { Tensor } from "./core/Tensor.js"
import type { Envoy, TensorProxy } from "./core/Tracer.js"
import type * as ModuleTree from "./models/ModuleTree.js"

/**
 * A shape of rank `minRank..maxRank` with dimensions `1..maxDim`.
 *
 * @example
 * Arb.shape({ maxRank: 3, maxDim: 4 })
 *
 * @since 0.1.0
 */
export const shape = (options: { readonly minRank?: number; readonly maxRank?: number; readonly maxDim?: number } = {}) =>
  fc.array(fc.integer({ min: 1, max: options.maxDim ?? 4 }), {
    minLength: options.minRank ?? 0,
    maxLength: options.maxRank ?? 3
  })

/**
 * A tensor of a dtype (default float32) and a shape (default random), with
 * finite values (floats in `[-range, range]`, integers in `[-100, 100]`).
 *
 * @example
 * Arb.tensor({ shape: [2, 3] })
 *
 * @since 0.1.0
 */
export const tensor = (
  options: {
    readonly dtype?: "float32" | "float64" | "int64" | "int32" | "bool"
    readonly shape?: ReadonlyArray<number>
    readonly range?: number
  } = {}
): fc.Arbitrary<Tensor> => {
  const dtype: DType.DType = options.dtype ?? "float32"
  const shapes = options.shape === undefined ? shape() : fc.constant([...options.shape])
  return shapes.chain((s) => {
    const size = s.reduce((a, b) => a * b, 1)
    const range = options.range ?? 10
    const element =
      dtype === "bool" ? fc.boolean().map((b) => (b ? 1 : 0))
      : dtype === "int64" || dtype === "int32" ? fc.integer({ min: -100, max: 100 })
      : fc.double({ min: -range, max: range, noNaN: true, noDefaultInfinity: true }).map((x) => (dtype === "float32" ? Math.fround(x) : x))
    return fc.array(element, { minLength: size, maxLength: size }).map((values) =>
      Tensor.from(dtype === "int64" ? values.map((v) => BigInt(v)) : values, dtype, s)
    )
  })
}

const words = [
  "once", "upon", "a", "time", "there", "was", "little", "girl", "boy", "named", "Lily", "Tom", "she", "he",
  "loved", "to", "play", "in", "the", "park", "with", "her", "his", "dog", "cat", "ball", "sun", "happy", "big", "red"
]

/**
 * A short English prompt of `1..maxWords` words from a small story vocabulary.
 *
 * @example
 * Arb.prompt({ maxWords: 8 })
 *
 * @since 0.1.0
 */
export const prompt = (options: { readonly minWords?: number; readonly maxWords?: number } = {}) =>
  fc
    .array(fc.constantFrom(...words), { minLength: options.minWords ?? 1, maxLength: options.maxWords ?? 10 })
    .map((ws) => {
      const s = ws.join(" ")
      return s.charAt(0).toUpperCase() + s.slice(1)
    })

/**
 * Token ids: a row of `1..maxLength` ids below `vocabSize`.
 *
 * @since 0.1.0
 */
export const tokenIds = (vocabSize: number, options: { readonly minLength?: number; readonly maxLength?: number } = {}) =>
  fc.array(fc.integer({ min: 0, max: vocabSize - 1 }), { minLength: options.minLength ?? 1, maxLength: options.maxLength ?? 8 })

/**
 * A module path of the model that has at least one call (so `.input` and
 * `.output` exist), optionally filtered.
 *
 * @example
 * Arb.modulePath(model.tree, (m) => m.type === "Linear")
 *
 * @since 0.1.0
 */
export const modulePath = (tree: ModuleTree.Tree, filter: (m: ModuleTree.Module) => boolean = () => true) =>
  fc.constantFrom(...[...tree.modules.values()].filter((m) => m.path !== "" && m.calls.length > 0 && filter(m)).map((m) => m.path))

/**
 * A position in a sequence of `length` tokens, counted from the start or
 * (negative) from the end.
 *
 * @since 0.1.0
 */
export const position = (length: number) => fc.integer({ min: -length, max: length - 1 })

/**
 * The envoy of a module path (walking `m.a.b.0.c`).
 *
 * @example
 * Arb.envoyAt(m, "model.layers.1.mlp").output
 *
 * @since 0.1.0
 */
export const envoyAt = (m: Envoy, path: string): Envoy =>
  path === "" ? m : path.split(".").reduce<Envoy>((e, part) => e[part], m)

/**
 * One random intervention: read a module's output, transform it, maybe write
 * it back, and return values. `fn` is a trace callback; `description` says
 * what it does (fast-check prints it on failure).
 *
 * @since 0.1.0
 */
export interface Experiment {
  readonly description: string
  readonly fn: (m: Envoy) => Record<string, TensorProxy>
}

type Transform = { readonly name: string; readonly apply: (x: TensorProxy) => TensorProxy }

const transforms: ReadonlyArray<(k: number) => Transform> = [
  (k) => ({ name: `mul(${k})`, apply: (x) => x.mul(k) }),
  (k) => ({ name: `add(${k})`, apply: (x) => x.add(k) }),
  () => ({ name: "softmax(-1)", apply: (x) => x.softmax(-1) }),
  () => ({ name: "mean(-1, keepdims)", apply: (x) => x.mean(-1, true) }),
  () => ({ name: "neg()", apply: (x) => x.neg() }),
  () => ({ name: "tanh()", apply: (x) => x.tanh() })
]

/**
 * Random intervention graphs over a model: reads of random module outputs,
 * chains of tensor operations on them, and (optionally) a set of a module's
 * output to a scaled copy of itself.
 *
 * @example
 * fc.assert(fc.asyncProperty(Arb.experiment(model.tree), async (e) => { await model.trace(x, e.fn) }))
 *
 * @since 0.1.0
 */
export const experiment = (
  tree: ModuleTree.Tree,
  options: { readonly filter?: (m: ModuleTree.Module) => boolean; readonly withSets?: boolean } = {}
): fc.Arbitrary<Experiment> => {
  const float = (m: ModuleTree.Module) => (options.filter ?? (() => true))(m)
  const step = fc.tuple(fc.integer({ min: 0, max: transforms.length - 1 }), fc.integer({ min: -3, max: 3 }))
  return fc
    .record({
      reads: fc.array(fc.tuple(modulePath(tree, float), fc.array(step, { maxLength: 3 })), { minLength: 1, maxLength: 3 }),
      set: options.withSets ? fc.option(fc.tuple(modulePath(tree, float), fc.integer({ min: -2, max: 2 }))) : fc.constant(null)
    })
    .map(({ reads, set }) => {
      const chains = reads.map(([path, steps]) => ({ path, steps: steps.map(([t, k]) => transforms[t](k)) }))
      const description = [
        ...(set ? [`set ${set[0]}.output := output * ${set[1]}`] : []),
        ...chains.map((c) => `${c.path}.output${c.steps.map((s) => "." + s.name).join("")}`)
      ].join("; ")
      return {
        description,
        fn: (m: Envoy) => {
          if (set) envoyAt(m, set[0]).output.update((x) => x.mul(set[1]))
          const out: Record<string, TensorProxy> = {}
          chains.forEach((c, i) => {
            out[`r${i}`] = c.steps.reduce<TensorProxy>((x, s) => s.apply(x), envoyAt(m, c.path).output)
          })
          return out
        }
      }
    })
}
