/**
 * Errors of tracing and interpretation. Each names the user's line that
 * recorded the failing node (`site`), and crosses the wire as data (they are
 * `Schema.TaggedError`s), so a remote run reports them as a local one does.
 *
 * @example
 * import { Errors } from "nnsight-ts"
 * try { await model.trace(prompt, (m) => m.model.layers[9].output) }
 * catch (e) { if (e instanceof Errors.ModuleIndexOutOfRange) console.log(e.message) }
 *
 * @since 0.1.0
 */
import { Schema } from "effect"

const at = (site: string) => (site === "" ? "" : ` (at ${site})`)

/**
 * A module path that the model does not have.
 *
 * @since 0.1.0
 */
export class UnknownModule extends Schema.TaggedError<UnknownModule>()("UnknownModule", {
  path: Schema.String,
  name: Schema.String,
  available: Schema.Array(Schema.String),
  site: Schema.String
}) {
  override get message(): string {
    const where = this.path === "" ? "the model" : `module ${this.path}`
    return `${where} has no submodule or attribute "${this.name}"${at(this.site)}; it has: ${this.available.join(", ")}`
  }
}

/**
 * An index past the end of a ModuleList (or of a module's calls, inputs or outputs).
 *
 * @since 0.1.0
 */
export class ModuleIndexOutOfRange extends Schema.TaggedError<ModuleIndexOutOfRange>()("ModuleIndexOutOfRange", {
  path: Schema.String,
  what: Schema.String,
  index: Schema.Number,
  size: Schema.Number,
  site: Schema.String
}) {
  override get message(): string {
    return `${this.what} index ${this.index} is out of range for ${this.path === "" ? "the model" : this.path}, which has ${this.size}${at(this.site)}`
  }
}

/**
 * A value the trace could not compute because the forward pass stopped early
 * (`t.stop()`) before the module it reads ran.
 *
 * @since 0.1.0
 */
export class Unavailable extends Schema.TaggedError<Unavailable>()("Unavailable", {
  site: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `the value recorded${at(this.site)} is unavailable: ${this.reason}`
  }
}

/**
 * A value a set or a tensor operation got that does not fit: shapes that do
 * not broadcast or match, an index past a dimension, a wrong dtype.
 *
 * @since 0.1.0
 */
export class InvalidValue extends Schema.TaggedError<InvalidValue>()("InvalidValue", {
  site: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `${this.reason}${at(this.site)}`
  }
}

/**
 * A set whose value depends on something the forward pass only computes after
 * the point it must be applied at.
 *
 * @since 0.1.0
 */
export class OutOfOrder extends Schema.TaggedError<OutOfOrder>()("OutOfOrder", {
  site: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `${this.reason}${at(this.site)}`
  }
}

/**
 * Bad trace input: wrong input names, shapes that do not batch, a missing input.
 *
 * @since 0.1.0
 */
export class InvalidInput extends Schema.TaggedError<InvalidInput>()("InvalidInput", {
  site: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `${this.reason}${at(this.site)}`
  }
}

/**
 * The runtime (onnxruntime) failed while executing a node or segment.
 *
 * @since 0.1.0
 */
export class ExecutionError extends Schema.TaggedError<ExecutionError>()("ExecutionError", {
  site: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `${this.reason}${at(this.site)}`
  }
}

/**
 * Any error a trace can fail with.
 *
 * @since 0.1.0
 */
export type TraceError =
  | UnknownModule
  | ModuleIndexOutOfRange
  | Unavailable
  | InvalidValue
  | OutOfOrder
  | InvalidInput
  | ExecutionError

/**
 * Schema of {@link TraceError}, for decoding errors from the wire.
 *
 * @since 0.1.0
 */
export const TraceError = Schema.Union([
  UnknownModule,
  ModuleIndexOutOfRange,
  Unavailable,
  InvalidValue,
  OutOfOrder,
  InvalidInput,
  ExecutionError
])

/**
 * Whether a value is one of the trace errors.
 *
 * @since 0.1.0
 */
export const isTraceError = (u: unknown): u is TraceError =>
  u instanceof UnknownModule ||
  u instanceof ModuleIndexOutOfRange ||
  u instanceof Unavailable ||
  u instanceof InvalidValue ||
  u instanceof OutOfOrder ||
  u instanceof InvalidInput ||
  u instanceof ExecutionError
