"""The optimised HLO text of a compiled module (`compiled.as_text()`), read for cost estimates.

`parse` gives its computations and instructions; `executed` lists the instructions one run of
the module executes as ops of their own (not inside fusions), each with how often it runs: a
while body as often as its trip count says (XLA's own cost analysis counts it once, so a scanned
layer stack or recurrence looks far too cheap). `dot_flops` is the matmul work of a dot
or convolution. hrmtext.model.flops counts compiled FLOPs with these, and
hrmtext.parallel.roofline estimates step time.
"""
import dataclasses
import math
import re

_HEADER = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$')
_HEAD = re.compile(r'^\s*(ROOT )?%?([\w.\-]+) = ')
_ARRAY = re.compile(r'\b([a-z]\w*)\[([^\]]*)\]')
_TRIP_COUNT = re.compile(r'"known_trip_count":\s*\{\s*"n":\s*"(\d+)"')
_COMMENT = re.compile(r'/\*.*?\*/')

# Ops that move or compute nothing: tuples, views, control (and the end of an async pair, whose
# start does the work: see `Instruction.base`).
FREE = frozenset((
    'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all', 'partition-id',
    'replica-id', 'opt-barrier', 'add-dependency', 'domain', 'get-dimension-size'))


def dtype_bytes(dtype: str) -> float:
  if dtype in ('pred', 'token'):
    return 0 if dtype == 'token' else 1
  bits = re.search(r'\d+', dtype)
  return int(bits.group()) / 8 if bits else 0


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of each array in a shape's text ('bf16[8,16]{1,0}' or a tuple of them)."""
  return [(dtype, tuple(int(d.lstrip('<=')) for d in dims.split(',') if d))
          for dtype, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> float:
  return sum(dtype_bytes(dtype) * math.prod(dims) for dtype, dims in arrays(shape))


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str  # the result's shape text, an array or a tuple
  opcode: str
  operands: tuple[str, ...]  # operand names, without '%'
  attributes: str  # the text after the operand list
  is_root: bool = False

  @property
  def base(self) -> str:
    """The opcode of the work an async start begins (fusion-start: fusion, all-gather-start:
    all-gather, async-start: async), else the opcode."""
    return self.opcode.removesuffix('-start')

  @property
  def is_free(self) -> bool:
    return self.opcode in FREE or self.opcode.endswith(('-done', '-update'))

  def attribute(self, key: str) -> str | None:
    """The value of `key=...`: a %name, a word, a {...} or a "string" (unquoted)."""
    found = re.search(rf'\b{re.escape(key)}=(%?[\w.\-$>]+|\{{[^}}]*\}}|"[^"]*")',
                      self.attributes)
    return found.group(1).lstrip('%').strip('"') if found else None

  def dims(self, key: str) -> list[int]:
    """The integers of an attribute such as lhs_contracting_dims={1,2}."""
    return [int(d) for d in re.findall(r'\d+', self.attribute(key) or '')]

  def called(self) -> list[str]:
    """The computations this instruction runs: a fusion's, a while's body, a call's, an async
    start's, a conditional's branches (scalar to_apply of reductions excluded)."""
    if self.opcode == 'conditional':
      branches = self.attribute('branch_computations')
      if branches:
        return [b.strip().lstrip('%') for b in branches.strip('{}').split(',')]
      return [self.attribute(k) for k in ('true_computation', 'false_computation')
              if self.attribute(k)]
    key = {'fusion': 'calls', 'while': 'body', 'call': 'to_apply', 'async': 'calls'}.get(
        self.base)
    return [self.attribute(key)] if key and self.attribute(key) else []


@dataclasses.dataclass
class Module:
  computations: dict[str, list[Instruction]]
  entry: str
  shapes: dict[tuple[str, str], str]  # (computation, instruction) -> shape text

  def shape(self, computation: str, operand: str) -> str:
    return self.shapes.get((computation, operand), '')

  def root(self, computation: str) -> Instruction:
    return next(i for i in reversed(self.computations[computation]) if i.is_root)

  def instruction(self, computation: str, name: str) -> Instruction | None:
    return next((i for i in self.computations[computation] if i.name == name), None)

  def trip_count(self, computation: str, loop: Instruction) -> int | None:
    """How often a while loop in `computation` runs: XLA's known_trip_count (GPU, CPU), else
    read from a `counter < constant` condition and the counter's constant start (XLA:TPU
    writes no trip count); None where neither says."""
    known = _TRIP_COUNT.search(loop.attributes)
    if known:
      return int(known.group(1))
    condition = loop.attribute('condition')
    compare = self.root(condition)
    if compare.opcode == 'fusion':  # compare(parameter, parameter) wrapping its operands
      inner = self.root(compare.called()[0])
      if inner.opcode != 'compare':
        return None
      params = {i.name: int(i.operands[0]) for i in self.computations[compare.called()[0]]
                if i.opcode == 'parameter'}
      compare = dataclasses.replace(inner, operands=tuple(
          compare.operands[params[o]] for o in inner.operands if o in params))
    direction = compare.attribute('direction')
    if compare.opcode != 'compare' or direction not in ('LT', 'LE') or len(compare.operands) != 2:
      return None
    counter, limit = (self.instruction(condition, o) for o in compare.operands)
    if not (counter and limit and counter.opcode == 'get-tuple-element'
            and limit.opcode == 'constant'):
      return None
    start = self._constant_element(computation, loop.operands[0], int(counter.attribute('index')))
    if start is None:
      return None
    return max(0, int(limit.operands[0]) - start + (direction == 'LE'))

  def _constant_element(self, computation: str, name: str, index: int) -> int | None:
    """The integer constant at `index` of tuple `name` (through copies), or None."""
    made = self.instruction(computation, name)
    if made is None or made.opcode != 'tuple':
      return None
    value = self.instruction(computation, made.operands[index])
    while value is not None and value.opcode == 'copy':
      value = self.instruction(computation, value.operands[0])
    if value is None or value.opcode != 'constant' or not value.operands[0].lstrip('-').isdigit():
      return None
    return int(value.operands[0])


def _closing(text: str, start: int) -> int:
  """The index of the ')' that closes the '(' at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i
  return len(text)


def _instruction(line: str) -> Instruction | None:
  head = _HEAD.match(line)
  if not head:
    return None
  rest = line[head.end():]
  end = _closing(rest, 0) + 1 if rest.startswith('(') else rest.find(' ')
  shape, rest = rest[:end], rest[end + 1:]
  opcode, paren, _ = rest.partition('(')
  if not paren:
    return None
  close = _closing(rest, len(opcode))
  operands = _COMMENT.sub('', rest[len(opcode) + 1:close])
  names = tuple(o.strip().lstrip('%') for o in operands.split(',') if o.strip())
  return Instruction(head.group(2), shape, opcode, names, rest[close + 1:], bool(head.group(1)))


def _logical_lines(hlo_text: str) -> list[str]:
  """The text's lines, an instruction that spans several (TPU kernels' metadata) joined."""
  lines = []
  for line in hlo_text.splitlines():
    continued = (lines and lines[-1][:1].isspace() and line.strip() not in ('', '}')
                 and not _HEAD.match(line) and not _HEADER.match(line))
    if continued:
      lines[-1] += ' ' + line
    else:
      lines.append(line)
  return lines


def parse(hlo_text: str) -> Module:
  computations, shapes, entry, name = {}, {}, None, None
  for line in _logical_lines(hlo_text):
    if line and not line[0].isspace():
      header = _HEADER.match(line)
      name = header.group(1) if header else None
      if name:
        computations[name] = []
        entry = name if line.startswith('ENTRY') else entry
    elif name and (instruction := _instruction(line)):
      computations[name].append(instruction)
      shapes[(name, instruction.name)] = instruction.shape
  return Module(computations, entry, shapes)


def dot_flops(module: Module, computation: str, instruction: Instruction) -> float:
  """2 per multiply-add of a dot or convolution; 0 for any other op."""
  if instruction.opcode not in ('dot', 'convolution'):
    return 0.0
  out = math.prod(arrays(instruction.shape)[0][1])
  lhs, rhs = (arrays(module.shape(computation, o)) for o in instruction.operands[:2])
  if instruction.opcode == 'dot':
    return 2.0 * out * math.prod(lhs[0][1][d] for d in instruction.dims('lhs_contracting_dims'))
  return _convolution_flops(instruction, lhs[0][1], rhs[0][1], arrays(instruction.shape)[0][1])


def _convolution_flops(instruction: Instruction, lhs, rhs, out) -> float:
  """2 per multiply-add of the window positions that fall on the input, not on its padding:
  XLA:TPU writes dots as convolutions whose padded windows stand for the output's head and
  feature dimensions, each output element taking one real position of each."""
  lhs_labels, rest = instruction.attribute('dim_labels').split('_')
  rhs_labels, out_labels = rest.split('->')
  window = dict(re.findall(r'(\w+)=([\w\-]+)', instruction.attribute('window') or ''))
  spatial = sorted(c for c in lhs_labels if c.isdigit())
  field = lambda key, default: [[int(v) for v in part.split('_')] for part in window[key].split(
      'x')] if key in window else [[default]] * len(spatial)
  size, pad, stride = field('size', 1), field('pad', 0), field('stride', 1)
  lhs_dilate, rhs_dilate = field('lhs_dilate', 1), field('rhs_dilate', 1)
  positions = 1
  for d, label in enumerate(spatial):
    positions *= _window_positions(lhs[lhs_labels.index(label)], out[out_labels.index(label)],
                                   size[d][0], pad[d][0], stride[d][0], lhs_dilate[d][0],
                                   rhs_dilate[d][0])
  return (2.0 * out[out_labels.index('b')] * out[out_labels.index('f')]
          * rhs[rhs_labels.index('i')] * positions)


def _window_positions(in_size, out_size, size, pad, stride, lhs_dilate, rhs_dilate) -> int:
  """(output position, window position) pairs of one spatial dimension that read an input
  element: input index o * stride - pad + w * rhs_dilate, on the lhs_dilate grid."""
  if lhs_dilate > 1:
    return sum(1 for w in range(size) for o in range(out_size)
               if (p := o * stride - pad + w * rhs_dilate) >= 0 and p % lhs_dilate == 0
               and p // lhs_dilate < in_size)
  count = 0
  for w in range(size):  # o * stride in [pad - w * rhs_dilate, in_size - 1 + pad - w * ...]
    low = max(0, -(-(pad - w * rhs_dilate) // stride))
    high = min(out_size - 1, (in_size - 1 + pad - w * rhs_dilate) // stride)
    count += max(0, high - low + 1)
  return count


def executed(module: Module, weight=None) -> list[tuple[str, Instruction, int]]:
  """(computation, instruction, executions per run) for each op one run of the module executes:
  not fusions' insides; while bodies times their trip count (once where it is not known); calls
  and async computations in place. Of a conditional's branches only the one of largest total
  `weight(computation, instruction)` (default: dot FLOPs), as an upper bound."""
  weight = weight or (lambda c, i: fused_dot_flops(module, c, i))
  ops = []

  def visit(computation, times, out):
    for instruction in module.computations[computation]:
      if instruction.opcode == 'while':
        trips = module.trip_count(computation, instruction)
        visit(instruction.called()[0], times * (1 if trips is None else trips), out)
      elif instruction.base in ('call', 'async'):
        for called in instruction.called():
          visit(called, times, out)
      elif instruction.opcode == 'conditional':
        branches = []
        for called in instruction.called():
          visit(called, times, branch := [])
          branches.append(branch)
        out.extend(max(branches, key=lambda b: sum(weight(c, i) * n for c, i, n in b),
                       default=[]))
      else:
        out.append((computation, instruction, times))

  visit(module.entry, 1, ops)
  return ops


def fused_dot_flops(module: Module, computation: str, instruction: Instruction) -> float:
  """dot_flops of an op, with a fusion's the dots inside it (nested fusions included)."""
  if instruction.base == 'fusion':
    fused = instruction.called()[0]
    return sum(fused_dot_flops(module, fused, i) for i in module.computations[fused])
  return dot_flops(module, computation, instruction)
