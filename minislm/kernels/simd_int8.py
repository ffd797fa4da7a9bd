"""Integer SIMD for int8 GEMM tiles, as Numba intrinsics: u8 x s8 products summed into int32 lanes.

Both x86 instruction sets multiply unsigned bytes by signed bytes and sum four neighbouring products into
one int32 lane, so a lane j holds sum_{t<4} a[4j+t] * b[4j+t]:

    int32x16, int32x8            16 (AVX-512) or 8 (AVX2) int32 lanes
    load_i32x16(row, j)          the 64 bytes row[j:j+64] (row: 1-D contiguous int8) as 16 lanes of 4 bytes
    load_i32x8(row, j)           the 32 bytes row[j:j+32] as 8 lanes
    bcast4x16(row, j)            the 4 bytes row[j:j+4] (uint8) repeated in all 16 lanes (a broadcast)
    bcast4x8(row, j)             the same in 8 lanes
    zeros_i32x16(), zeros_i32x8()
    store_i32x16(row, j, v)      row[j:j+16] = v   (row: 1-D contiguous int32)
    store_i32x8(row, j, v)       row[j:j+8] = v
    dpbusd16(acc, a, b)          acc + sum of 4 u8(a) x s8(b) per lane: one AVX-512 VNNI vpdpbusd, exact
    madd_u8s8_8(acc, a, b)       the same on AVX2: vpmaddubsw (pairs -> int16, SATURATING at +-32767) then
                                 vpmaddwd with ones (pairs of int16 -> int32) and an add

vpmaddubsw's saturation is the one trap: two products of 255 x 127 sum to 64770 > 32767. Callers keep
every pair in range (int8.py quantizes weights to [-63, 63]: 2 x 255 x 63 = 32130). Unlike simd.py these
name x86 instructions (llvm.x86.*): a kernel using them compiles only for a CPU that has them, so
int8.py picks its tile by the CPU's features. No bounds checks: callers guarantee the bytes exist.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V16 = ir.VectorType(_I32, 16)
_V8 = ir.VectorType(_I32, 8)


class Int32x16(types.Type):
    def __init__(self):
        super().__init__(name="int32x16")


class Int32x8(types.Type):
    def __init__(self):
        super().__init__(name="int32x8")


int32x16 = Int32x16()
int32x8 = Int32x8()


@register_model(Int32x16)
class _Int32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16)


@register_model(Int32x8)
class _Int32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8)


def _check_row(row, dtype):
    if not (isinstance(row, types.Array) and row.ndim == 1 and row.dtype == dtype and row.layout == "C"):
        raise TypeError(f"expected a 1-D contiguous {dtype} array, got {row}")


def _pointer(context, builder, array_type, array, start, pointee):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [start]), pointee.as_pointer())


def _load(vector):
    def codegen(context, builder, signature, args):
        return builder.load(_pointer(context, builder, signature.args[0], *args, vector), align=1)

    return codegen


def _store(vector):
    def codegen(context, builder, signature, args):
        builder.store(args[2], _pointer(context, builder, signature.args[0], args[0], args[1], vector), align=4)
        return context.get_dummy_value()

    return codegen


def _broadcast4(vector):
    def codegen(context, builder, signature, args):
        four_bytes = builder.load(_pointer(context, builder, signature.args[0], *args, _I32), align=1)
        one = builder.insert_element(ir.Constant(vector, ir.Undefined), four_bytes, ir.Constant(_I32, 0))
        lane0 = ir.Constant(ir.VectorType(_I32, vector.count), [0] * vector.count)
        return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), lane0)

    return codegen


def _zeros(vector):
    def codegen(context, builder, signature, args):
        return ir.Constant(vector, [0] * vector.count)

    return codegen


@intrinsic
def load_i32x16(typingctx, row, start):
    """the 64 bytes row[start:start+64] of an int8 row, as 16 int32 lanes"""
    _check_row(row, types.int8)
    return int32x16(row, start), _load(_V16)


@intrinsic
def load_i32x8(typingctx, row, start):
    """the 32 bytes row[start:start+32] of an int8 row, as 8 int32 lanes"""
    _check_row(row, types.int8)
    return int32x8(row, start), _load(_V8)


@intrinsic
def bcast4x16(typingctx, row, start):
    """the 4 bytes row[start:start+4] of a uint8 row in every one of 16 lanes"""
    _check_row(row, types.uint8)
    return int32x16(row, start), _broadcast4(_V16)


@intrinsic
def bcast4x8(typingctx, row, start):
    """the 4 bytes row[start:start+4] of a uint8 row in every one of 8 lanes"""
    _check_row(row, types.uint8)
    return int32x8(row, start), _broadcast4(_V8)


@intrinsic
def zeros_i32x16(typingctx):
    """16 int32 lanes of 0"""
    return int32x16(), _zeros(_V16)


@intrinsic
def zeros_i32x8(typingctx):
    """8 int32 lanes of 0"""
    return int32x8(), _zeros(_V8)


@intrinsic
def store_i32x16(typingctx, row, start, value):
    """row[start:start+16] = value (an int32 row)"""
    _check_row(row, types.int32)
    return types.void(row, start, int32x16), _store(_V16)


@intrinsic
def store_i32x8(typingctx, row, start, value):
    """row[start:start+8] = value (an int32 row)"""
    _check_row(row, types.int32)
    return types.void(row, start, int32x8), _store(_V8)


@intrinsic
def dpbusd16(typingctx, acc, a, b):
    """acc + sum over 4 bytes of u8(a) x s8(b), lane by lane (AVX-512 VNNI vpdpbusd; no saturation)"""

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, args)

    return int32x16(int32x16, int32x16, int32x16), codegen


@intrinsic
def madd_u8s8_8(typingctx, acc, a, b):
    """acc + sum over 4 bytes of u8(a) x s8(b), lane by lane, on AVX2: vpmaddubsw + vpmaddwd + vpaddd.

    Each pair of products is first summed into an int16 with saturation (see the module doc)."""

    def codegen(context, builder, signature, args):
        bytes32, shorts16 = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16)
        maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(shorts16, [bytes32, bytes32]),
                                                 "llvm.x86.avx2.pmadd.ub.sw")
        maddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8, [shorts16, shorts16]),
                                                "llvm.x86.avx2.pmadd.wd")
        pairs = builder.call(maddubs, [builder.bitcast(args[1], bytes32), builder.bitcast(args[2], bytes32)])
        quads = builder.call(maddwd, [pairs, ir.Constant(shorts16, [1] * 16)])
        return builder.add(args[0], quads)

    return int32x8(int32x8, int32x8, int32x8), codegen
