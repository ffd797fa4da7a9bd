"""SIMD operations on 16 float32 lanes, as Numba intrinsics: enough to write a GEMM register tile.

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

(Max reductions are the one loop LLVM will not vectorise from Numba code: Numba's max() keeps Python's
NaN rules, which LLVM cannot reorder.) Each is a few lines of LLVM IR (llvmlite's IRBuilder): an LLVM vector <16 x float> and the llvm.fma
intrinsic, nothing machine-specific; LLVM maps them to the CPU it compiles for. No bounds checks:
callers guarantee j + 16 <= len(row).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_VECTOR = ir.VectorType(ir.FloatType(), LANES)


class Float32x16(types.Type):
    def __init__(self):
        super().__init__(name="float32x16")


float32x16 = Float32x16()


@register_model(Float32x16)
class _Float32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def _vector_pointer(context, builder, array_type, array, start):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [start]), _VECTOR.as_pointer())


def _check_row(row):
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.dtype == types.float32 and row.layout == "C"):
        raise TypeError(f"expected a 1-D contiguous float32 array, got {row}")


@intrinsic
def load16(typingctx, row, start):
    """row[start:start+16] -> float32x16"""
    _check_row(row)

    def codegen(context, builder, signature, args):
        return builder.load(_vector_pointer(context, builder, signature.args[0], *args), align=4)

    return float32x16(row, start), codegen


@intrinsic
def store16(typingctx, row, start, value):
    """row[start:start+16] = value"""
    _check_row(row)

    def codegen(context, builder, signature, args):
        builder.store(args[2], _vector_pointer(context, builder, signature.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()

    return types.void(row, start, float32x16), codegen


@intrinsic
def splat16(typingctx, x):
    """float32 -> float32x16 with x in every lane"""

    def codegen(context, builder, signature, args):
        one = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        lane0 = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        return builder.shuffle_vector(one, ir.Constant(_VECTOR, ir.Undefined), lane0)

    return float32x16(types.float32), codegen


@intrinsic
def fma16(typingctx, a, b, c):
    """a * b + c lane by lane (float32x16), rounded once"""

    def codegen(context, builder, signature, args):
        return builder.call(_vector_intrinsic(builder, "llvm.fma.v16f32", 3), args)

    return float32x16(float32x16, float32x16, float32x16), codegen


@intrinsic
def add16(typingctx, a, b):
    """a + b lane by lane (float32x16)"""

    def codegen(context, builder, signature, args):
        return builder.fadd(*args)

    return float32x16(float32x16, float32x16), codegen


def _vector_intrinsic(builder, name, n_args, result=_VECTOR):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, [_VECTOR] * n_args), name)


@intrinsic
def max16(typingctx, a, b):
    """lane-by-lane maximum of two float32x16 (a NaN lane yields the other operand)"""

    def codegen(context, builder, signature, args):
        return builder.call(_vector_intrinsic(builder, "llvm.maxnum.v16f32", 2), args)

    return float32x16(float32x16, float32x16), codegen


@intrinsic
def hmax16(typingctx, a):
    """the largest of the 16 lanes of a float32x16, as a float32"""

    def codegen(context, builder, signature, args):
        return builder.call(_vector_intrinsic(builder, "llvm.vector.reduce.fmax.v16f32", 1, ir.FloatType()), args)

    return types.float32(float32x16), codegen
