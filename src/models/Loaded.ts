/**
 * A loaded ONNX model as the interpreters see it: the decoded IR, its module
 * tree, the segment index over its linear order, and the canonical cut
 * positions (top-level blocks) that segments are planned on.
 *
 * @example
 * import * as Loaded from "./Loaded.js"
 * const loaded = Loaded.fromBytes(bytes)
 * loaded.canonicalCuts // [14, 60, ...]
 *
 * @since 0.1.0
 */
import * as ModuleTree from "./ModuleTree.js"
import * as Onnx from "./Onnx.js"
import * as Segments from "./Segments.js"

/**
 * A decoded, indexed model.
 *
 * @since 0.1.0
 */
export interface Loaded {
  readonly model: Onnx.Model
  readonly tree: ModuleTree.Tree
  readonly index: Segments.Index
  /** Positions where the model is always cut: the borders of its top-level blocks. */
  readonly canonicalCuts: ReadonlyArray<number>
}

/**
 * Options for reading a model.
 *
 * @since 0.1.0
 */
export interface Options extends ModuleTree.Options {}

/**
 * Decodes and indexes a model from ONNX bytes.
 *
 * @example
 * const loaded = Loaded.fromBytes(fs.readFileSync("model.onnx"))
 *
 * @since 0.1.0
 */
export const fromBytes = (bytes: Uint8Array, options: Options = {}): Loaded => fromModel(Onnx.decode(bytes), options)

/**
 * Indexes a decoded model.
 *
 * @since 0.1.0
 */
export const fromModel = (model: Onnx.Model, options: Options = {}): Loaded => {
  const tree = ModuleTree.build(model.graph, options)
  const index = Segments.index(model, tree.order)
  return { model, tree, index, canonicalCuts: canonicalCuts(tree) }
}

/**
 * The borders of the model's blocks: the calls of the children of its largest
 * ModuleList (decoder layers), or, without one, of the root's children.
 * Segments this coarse keep onnxruntime's per-run cost low, bound how many
 * sessions hold each weight, and make block outputs (the most-read
 * activations) segment outputs for free.
 *
 * @example
 * Loaded.canonicalCuts(tree) // [48, 217, 386, 555, 724, 893] for stories260K
 *
 * @since 0.1.0
 */
export const canonicalCuts = (tree: ModuleTree.Tree): ReadonlyArray<number> => {
  const span = (m: ModuleTree.Module) => m.calls.reduce((a, c) => a + (c.end - c.start), 0)
  let blocks: ModuleTree.Module | undefined
  for (const m of tree.modules.values()) {
    if (m.type !== "ModuleList" || m.children.length === 0) continue
    const size = m.children.reduce((a, c) => a + span(c), 0)
    if (blocks === undefined || size > blocks.children.reduce((a, c) => a + span(c), 0)) blocks = m
  }
  const units = blocks?.children ?? tree.root.children
  const cuts = new Set<number>()
  for (const m of units) {
    for (const c of m.calls) {
      cuts.add(c.start)
      cuts.add(c.end)
    }
  }
  const n = tree.order.length
  return [...cuts].filter((p) => p > 0 && p < n).sort((a, b) => a - b)
}
