/**
 * The values interpreters hold for nodes: tensors, tuples of tensors (multi-
 * output ops), JavaScript scalars, JSON values, and the mutable lists and
 * dictionaries of a graph's builtins; and how each becomes what a user sees.
 *
 * @example
 * import * as Values from "./Values.js"
 * Values.truthy(Tensor.from([true, true], "bool")) // true
 *
 * @since 0.1.0
 */
import { Tensor } from "../core/Tensor.js"

/**
 * A JSON value in the graph (strings, lists, objects; numbers and booleans
 * are plain scalars).
 *
 * @since 0.1.0
 */
export class Json {
  constructor(readonly value: unknown) {}
}

/**
 * A mutable list (`s.list()`).
 *
 * @since 0.1.0
 */
export class List {
  constructor(readonly items: Array<Val>) {}
}

/**
 * A mutable dictionary (`s.dict()`).
 *
 * @since 0.1.0
 */
export class Dict {
  readonly entries = new Map<string, Val>()
}

/**
 * Any value.
 *
 * @since 0.1.0
 */
export type Val = Tensor | ReadonlyArray<Tensor> | number | boolean | Json | List | Dict

/**
 * A JSON value as a graph value (numbers and booleans become scalars).
 *
 * @since 0.1.0
 */
export const fromJson = (u: unknown): Val =>
  typeof u === "number" || typeof u === "boolean" ? u : Array.isArray(u) ? new List(u.map(fromJson)) : new Json(u)

/**
 * Whether a value counts as true in a condition: a true scalar, a tensor
 * whose elements are all non-zero, a non-empty list or string.
 *
 * @since 0.1.0
 */
export const truthy = (v: Val): boolean => {
  if (typeof v === "boolean") return v
  if (typeof v === "number") return v !== 0
  if (v instanceof Tensor) {
    const data = v.data as ArrayLike<number | bigint | string>
    for (let i = 0; i < data.length; i++) if (!data[i]) return false
    return data.length > 0
  }
  if (v instanceof List) return v.items.length > 0
  if (v instanceof Dict) return v.entries.size > 0
  if (v instanceof Json) return Boolean(v.value) && !(Array.isArray(v.value) && v.value.length === 0)
  return (v as ReadonlyArray<Tensor>).length > 0
}

/**
 * The items a loop runs over: a list's items, a JSON array's, or a tensor's
 * rows (first dimension).
 *
 * @since 0.1.0
 */
export const items = (v: Val): ReadonlyArray<Val> => {
  if (v instanceof List) return [...v.items]
  if (v instanceof Json && Array.isArray(v.value)) return v.value.map(fromJson)
  if (v instanceof Tensor) {
    if (v.shape.length === 0) throw new Error("cannot iterate over a 0-d tensor")
    return Array.from({ length: v.shape[0] }, (_, i) => v.at(i))
  }
  if (v instanceof Dict) return [...v.entries.keys()].map((k) => new Json(k))
  throw new Error(`cannot iterate over ${typeof v === "object" ? "this value" : String(v)}`)
}

/**
 * What the user gets back: tensors as `Tensor`, lists as arrays, dictionaries
 * as objects, JSON as itself. Lists are copied, so later mutation of the graph
 * list does not show.
 *
 * @since 0.1.0
 */
export const toUser = (v: Val): unknown => {
  if (v instanceof Tensor) return v
  if (v instanceof List) return v.items.map(toUser)
  if (v instanceof Dict) return Object.fromEntries([...v.entries].map(([k, x]) => [k, toUser(x)]))
  if (v instanceof Json) return v.value
  if (Array.isArray(v)) return (v as ReadonlyArray<Tensor>)[0]
  return v
}

/**
 * A value a user's function returned, as a graph value.
 *
 * @since 0.1.0
 */
export const fromUser = (u: unknown): Val => {
  if (u instanceof Tensor) return u
  if (Array.isArray(u)) return new List(u.map(fromUser))
  if (typeof u === "number" || typeof u === "boolean") return u
  if (typeof u === "bigint") return Number(u)
  return new Json(u)
}
