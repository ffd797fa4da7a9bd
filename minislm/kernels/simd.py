"""SIMD operations on 16 and 8 float32 lanes, as Numba intrinsics: enough to write a GEMM register tile.

LLVM's auto-vectorisers decide for themselves whether a loop becomes vector code, and a register tile
(tiles.py) is exactly the case they get wrong: its accumulators must stay in registers across the
whole k loop. With a vector type of our own the tile says it directly:

    float32x16                   a value of 16 float32 lanes: one AVX-512 register (two AVX2 ones)
    load16(row, j)               row[j:j+16] -> float32x16   (row: 1-D contiguous float32 array)
    store16(row, j, v)           row[j:j+16] = v
    splat16(x)                   float32 x in all 16 lanes (a broadcast)
    fma16(a, b, c)               a * b + c lane by lane, one fused multiply-add instruction
    add16(a, b)                  a + b lane by lane
    max16(a, b), hmax16(a)       lane-by-lane maximum; the largest of a's 16 lanes (softmax's row max)
    min16(a, b), hmin16(a)       the same for the minimum (int8 activations' row range)

and the same eight names ending in 8 (float32x8, load8, ... hmax8) for 8 lanes: one AVX2 register, the
unit of the AVX2 tile. (Max reductions are the one loop LLVM will not vectorise from Numba code: Numba's
max() keeps Python's NaN rules, which LLVM cannot reorder.) Each is a few lines of LLVM IR (llvmlite's
IRBuilder): an LLVM vector <16 x float> or <8 x float> and the llvm.fma intrinsic, nothing
machine-specific; LLVM maps them to the CPU it compiles for. No bounds checks: callers guarantee
j + lanes <= len(row).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
LANES8 = 8
_VECTOR = ir.VectorType(ir.FloatType(), LANES)
_VECTOR8 = ir.VectorType(ir.FloatType(), LANES8)


class Float32x16(types.Type):
    def __init__(self):
        super().__init__(name="float32x16")


class Float32x8(types.Type):
    def __init__(self):
        super().__init__(name="float32x8")


float32x16 = Float32x16()
float32x8 = Float32x8()


@register_model(Float32x16)
class _Float32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


@register_model(Float32x8)
class _Float32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR8)


def _vector_pointer(context, builder, array_type, array, start, vector=_VECTOR):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [start]), vector.as_pointer())


def _check_row(row):
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.dtype == types.float32 and row.layout == "C"):
        raise TypeError(f"expected a 1-D contiguous float32 array, got {row}")


def _load(vector):
    def codegen(context, builder, signature, args):
        return builder.load(_vector_pointer(context, builder, signature.args[0], *args, vector=vector), align=4)

    return codegen


def _store(vector):
    def codegen(context, builder, signature, args):
        pointer = _vector_pointer(context, builder, signature.args[0], args[0], args[1], vector=vector)
        builder.store(args[2], pointer, align=4)
        return context.get_dummy_value()

    return codegen


def _splat(vector):
    def codegen(context, builder, signature, args):
        one = builder.insert_element(ir.Constant(vector, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        lane0 = ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count)
        return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), lane0)

    return codegen


def _add(context, builder, signature, args):
    return builder.fadd(*args)


def _vector_intrinsic(builder, name, n_args, result=_VECTOR, vector=_VECTOR):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, [vector] * n_args), name)


def _call(name, n_args, vector, scalar_result=False):
    # a call of the LLVM intrinsic `name` on n_args vectors, e.g. llvm.fma.v8f32
    def codegen(context, builder, signature, args):
        result = ir.FloatType() if scalar_result else vector
        return builder.call(_vector_intrinsic(builder, name, n_args, result, vector), args)

    return codegen


@intrinsic
def load16(typingctx, row, start):
    """row[start:start+16] -> float32x16"""
    _check_row(row)
    return float32x16(row, start), _load(_VECTOR)


@intrinsic
def store16(typingctx, row, start, value):
    """row[start:start+16] = value"""
    _check_row(row)
    return types.void(row, start, float32x16), _store(_VECTOR)


@intrinsic
def splat16(typingctx, x):
    """float32 -> float32x16 with x in every lane"""
    return float32x16(types.float32), _splat(_VECTOR)


@intrinsic
def fma16(typingctx, a, b, c):
    """a * b + c lane by lane (float32x16), rounded once"""
    return float32x16(float32x16, float32x16, float32x16), _call("llvm.fma.v16f32", 3, _VECTOR)


@intrinsic
def add16(typingctx, a, b):
    """a + b lane by lane (float32x16)"""
    return float32x16(float32x16, float32x16), _add


@intrinsic
def max16(typingctx, a, b):
    """lane-by-lane maximum of two float32x16 (a NaN lane yields the other operand)"""
    return float32x16(float32x16, float32x16), _call("llvm.maxnum.v16f32", 2, _VECTOR)


@intrinsic
def hmax16(typingctx, a):
    """the largest of the 16 lanes of a float32x16, as a float32"""
    return types.float32(float32x16), _call("llvm.vector.reduce.fmax.v16f32", 1, _VECTOR, scalar_result=True)


@intrinsic
def min16(typingctx, a, b):
    """lane-by-lane minimum of two float32x16 (a NaN lane yields the other operand)"""
    return float32x16(float32x16, float32x16), _call("llvm.minnum.v16f32", 2, _VECTOR)


@intrinsic
def hmin16(typingctx, a):
    """the smallest of the 16 lanes of a float32x16, as a float32"""
    return types.float32(float32x16), _call("llvm.vector.reduce.fmin.v16f32", 1, _VECTOR, scalar_result=True)


@intrinsic
def load8(typingctx, row, start):
    """row[start:start+8] -> float32x8"""
    _check_row(row)
    return float32x8(row, start), _load(_VECTOR8)


@intrinsic
def store8(typingctx, row, start, value):
    """row[start:start+8] = value"""
    _check_row(row)
    return types.void(row, start, float32x8), _store(_VECTOR8)


@intrinsic
def splat8(typingctx, x):
    """float32 -> float32x8 with x in every lane"""
    return float32x8(types.float32), _splat(_VECTOR8)


@intrinsic
def fma8(typingctx, a, b, c):
    """a * b + c lane by lane (float32x8), rounded once"""
    return float32x8(float32x8, float32x8, float32x8), _call("llvm.fma.v8f32", 3, _VECTOR8)


@intrinsic
def add8(typingctx, a, b):
    """a + b lane by lane (float32x8)"""
    return float32x8(float32x8, float32x8), _add


@intrinsic
def max8(typingctx, a, b):
    """lane-by-lane maximum of two float32x8 (a NaN lane yields the other operand)"""
    return float32x8(float32x8, float32x8), _call("llvm.maxnum.v8f32", 2, _VECTOR8)


@intrinsic
def hmax8(typingctx, a):
    """the largest of the 8 lanes of a float32x8, as a float32"""
    return types.float32(float32x8), _call("llvm.vector.reduce.fmax.v8f32", 1, _VECTOR8, scalar_result=True)
