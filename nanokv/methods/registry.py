"""Every method by the name users know it, and the one place methods are made."""

from nanokv.methods.a2sf import A2SF
from nanokv.methods.adakv import AdaKV
from nanokv.methods.h2o import H2O
from nanokv.methods.headkv import HeadKV
from nanokv.methods.keyformer import Keyformer
from nanokv.methods.base import Method
from nanokv.methods.cake import CAKE
from nanokv.methods.cam import CaM
from nanokv.methods.chunkkv import ChunkKV
from nanokv.methods.d2o import D2O
from nanokv.methods.duoattention import DuoAttention
from nanokv.methods.kivi import KIVI
from nanokv.methods.knorm import KNorm
from nanokv.methods.lorc import LoRC
from nanokv.methods.kvsharer import KVSharer
from nanokv.methods.kvzip import KVzip
from nanokv.methods.keepkv import KeepKV
from nanokv.methods.kvmerger import KVMerger
from nanokv.methods.minicache import MiniCache
from nanokv.methods.nacl import NACL
from nanokv.methods.palu import Palu
from nanokv.methods.per_token_quant import Int4, Int8
from nanokv.methods.pyramidkv import PyramidKV
from nanokv.methods.quest import Quest
from nanokv.methods.random import RandomMethod
from nanokv.methods.r_kv import RKV
from nanokv.methods.roco import RoCo
from nanokv.methods.sage_kv import SageKV
from nanokv.methods.scissorhands import Scissorhands
from nanokv.methods.sepllm import SepLLM
from nanokv.methods.simlayerkv import SimLayerKV
from nanokv.methods.snapkv import SnapKV
from nanokv.methods.streaming_llm import StreamingLLM
from nanokv.methods.think import ThinK
from nanokv.methods.tova import TOVA
from nanokv.methods.vatp import VATP
from nanokv.methods.alisa import ALISA
from nanokv.methods.corm import CORM
from nanokv.methods.inf_mllm import InfMLLM
from nanokv.methods.buzz import BUZZ
from nanokv.methods.scope import SCOPE
from nanokv.methods.hashevict import HashEvict
from nanokv.methods.morphkv import MorphKV
from nanokv.methods.kvcrush import KVCrush
from nanokv.methods.fastgen import FastGen
from nanokv.methods.pyramidinfer import PyramidInfer
from nanokv.methods.kv_compress import KVCompress
from nanokv.methods.dynamickv import DynamicKV
from nanokv.methods.dbudgetkv import DBudgetKV
from nanokv.methods.razorattention import RazorAttention
from nanokv.methods.retrieval_head import RetrievalHead
from nanokv.methods.gear import GEAR
from nanokv.methods.zipcache import ZipCache
from nanokv.methods.mikv import MiKV
from nanokv.methods.qaq import QAQ
from nanokv.methods.decoquant import DecoQuant
from nanokv.methods.minikv import MiniKV
from nanokv.methods.leankv import LeanKV
from nanokv.methods.bitdecoding import BitDecoding
from nanokv.methods.kvquant import KVQuant
from nanokv.methods.skvq import SKVQ
from nanokv.methods.wkvquant import WKVQuant
from nanokv.methods.kvtuner import KVTuner
from nanokv.methods.mustafar import Mustafar
from nanokv.methods.eckvh import ECKVH
from nanokv.methods.tidaldecode import TidalDecode
from nanokv.methods.recycled_attention import RecycledAttention
from nanokv.methods.tokenselect import TokenSelect
from nanokv.methods.reattention import ReAttention
from nanokv.methods.rocketkv import RocketKV
from nanokv.methods.lserve import LServe
from nanokv.methods.loki import Loki
from nanokv.methods.double_sparsity import DoubleSparsity
from nanokv.methods.squeezed_attention import SqueezedAttention
from nanokv.methods.arkvale import ArkVale
from nanokv.methods.shadowkv import ShadowKV
from nanokv.methods.specache import SpeCache
from nanokv.methods.clusterkv import ClusterKV
from nanokv.methods.pqcache import PQCache
from nanokv.methods.sentencekv import SentenceKV
from nanokv.methods.alisa_offload import ALISAOffload
from nanokv.methods.critiprefill import CritiPrefill
from nanokv.methods.minference import MInference
from nanokv.methods.magicpig import MagicPIG
from nanokv.methods.retrievalattention import RetrievalAttention
from nanokv.methods.fastkv import FastKV
from nanokv.methods.gemfilter import GemFilter
from nanokv.methods.lazyllm import LazyLLM
from nanokv.methods.infinipot import InfiniPot
from nanokv.methods.citrus import CItruS
from nanokv.methods.cacheblend import CacheBlend
from nanokv.methods.homer import Homer

METHODS: dict[str, type[Method]] = {m.name: m for m in (Method, RandomMethod, StreamingLLM, KNorm, SnapKV, PyramidKV, AdaKV, H2O, TOVA,
                                                         A2SF, Keyformer, Scissorhands, RoCo, VATP, RKV,
                                                         KIVI, Int4, Int8, Quest,
                                                         SageKV, NACL, SimLayerKV, ChunkKV,
                                                         SepLLM, CAKE, KVzip, DuoAttention, HeadKV,
                                                         CaM, D2O, KVMerger, KVSharer, LoRC, Palu, ThinK, MiniCache,
                                                         # the third wave (issue 27)
                                                         ALISA, CORM, InfMLLM, BUZZ, SCOPE, HashEvict, MorphKV, KVCrush, FastGen,
                                                         PyramidInfer, KVCompress, DynamicKV, DBudgetKV, RazorAttention, RetrievalHead,
                                                         KeepKV,
                                                         # the third wave: quantization and low-rank (issue 28)
                                                         GEAR, ZipCache, MiKV, QAQ, DecoQuant, MiniKV, LeanKV, BitDecoding,
                                                         KVQuant, SKVQ, WKVQuant, KVTuner, Mustafar, ECKVH,
                                                         # the third wave: query-aware sparse decode (issue 29)
                                                         TidalDecode, RecycledAttention, TokenSelect, ReAttention, RocketKV, LServe, Loki, DoubleSparsity, SqueezedAttention,
                                                         # the third wave: offloaded and recallable KV, multi-pass and sparse prefill (issue 30)
                                                         ArkVale, ShadowKV, SpeCache, ClusterKV, PQCache, SentenceKV, ALISAOffload, MagicPIG,
                                                         RetrievalAttention,
                                                         GemFilter, FastKV, LazyLLM, InfiniPot, CItruS, CacheBlend,
                                                         CritiPrefill, MInference,
                                                         Homer)}
QUANTIZERS = [name for name, m in METHODS.items() if m.quantizes]


def parse_options(pairs: list[str], what: str) -> dict:
    """["window_size=16", ...] -> {"window_size": "16"}; the method converts and checks values.
    `what` names where they came from, for the error."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {pair!r} is not KEY=VALUE")
        options[key] = value
    return options


def parse_spec(spec: str) -> tuple[str, dict]:
    """'kivi:bits=4:residual_length=64' -> ('kivi', {'bits': '4', 'residual_length': '64'}): a method
    with its options in one string, for lists of settings (python -m nanokv.eval --methods)."""
    name, *pairs = spec.split(":")
    return name, parse_options(pairs, f"method {spec!r}: option (after a colon, e.g. kivi:bits=4)")


def is_quantizer(spec: str) -> bool:
    """A method that only quantizes (keeps every token): it takes no compression or budget."""
    return parse_spec(spec)[0] in QUANTIZERS


def selects_pages(spec: str) -> bool:
    """A method that takes a budget alone, no compression: a reader of tokens per decode step (quest,
    loki, ...; rocketkv also evicts at prefill, by the same budget; an offloader recalls them: arkvale,
    shadowkv, ...) or a sparse prefill (critiprefill, minference: keys per query row or segment)."""
    name = parse_spec(spec)[0]
    return name in METHODS and (METHODS[name].selects_pages or METHODS[name].sparse_prefill)


def runs_once(spec: str) -> bool:
    """A method with no compression or budget to sweep: full, a quantizer alone, a blend (cacheblend:
    its recompute ratio is an option)."""
    name = parse_spec(spec)[0]
    return name == "full" or is_quantizer(spec) or (name in METHODS and METHODS[name].blends)


def check_method(name: str) -> str:
    """A method's name, or `evictor+quantizer` (e.g. snapkv+kivi): fewer tokens, each in fewer bits;
    either may carry options after a colon (kivi:bits=4)."""
    spec, name = name, parse_spec(name)[0]
    parts = name.split("+")
    for part in parts:
        if part not in METHODS:
            raise ValueError(f"unknown method {part!r}; valid: {', '.join(METHODS)}, or EVICTION+QUANTIZATION "
                             f"such as snapkv+kivi")
    if len(parts) == 2:
        evictor, quantizer = (METHODS[p] for p in parts)
        if quantizer.name not in QUANTIZERS or evictor.name in QUANTIZERS or evictor is Method or evictor.selects_pages:
            raise ValueError(f"method {name!r}: combine an eviction method with a quantization method "
                             f"({', '.join(QUANTIZERS)}), in that order, e.g. snapkv+kivi")
        storage = ("keeps tokens as low-rank latents" if evictor.stores_latents else
                   "keeps older keys in fewer channels" if evictor.prunes_key_channels else
                   "shares whole layers" if evictor.layer_sources is not Method.layer_sources else None)
        if evictor.quantization is not None:  # an evictor with a codec of its own (minikv, leankv)
            raise ValueError(f"method {name!r}: {evictor.name} quantizes what it keeps itself; use {evictor.name} alone")
        if storage:  # a storage of its own, which quantized blocks cannot be
            raise ValueError(f"method {name!r}: {evictor.name} {storage}, which quantized blocks cannot hold; "
                             f"use {evictor.name} alone")
        if evictor.trims_earlier_layers:
            raise ValueError(f"method {name!r}: {evictor.name} compacts earlier layers again during prefill, "
                             f"which quantized blocks cannot follow; use {evictor.name} alone")
        if evictor.blends:
            raise ValueError(f"method {name!r}: {evictor.name} overwrites recomputed tokens' K/V in place, which quantized "
                             f"blocks cannot; use {evictor.name} alone")
        if evictor.evicts_during_decode:
            raise ValueError(f"method {name!r}: {evictor.name} evicts during decode, which would move tokens inside "
                             f"quantized blocks; combine {quantizer.name} with a prefill-time method "
                             f"({', '.join(n for n, m in METHODS.items() if n not in QUANTIZERS and not m.evicts_during_decode and not m.selects_pages and not m.blends and m is not Method)})")
    elif len(parts) > 2:
        raise ValueError(f"method {name!r}: at most one eviction method and one quantization method, e.g. snapkv+kivi")
    return spec


def make_method(name: str, compression: float = 0.0, budget: int | None = None, **options) -> Method:
    name, inline = parse_spec(check_method(name))
    options = {**inline, **options}
    if "+" not in name:
        return METHODS[name](compression=compression, budget=budget, **options)
    evictor, quantizer = (METHODS[p] for p in name.split("+"))
    if evictor.calibration and quantizer.calibration:  # the engine binds one artifact per method
        raise ValueError(f"method {name!r}: {evictor.name} and {quantizer.name} each need a calibration of their "
                         f"own; combine {quantizer.name} with an uncalibrated eviction method (snapkv)")
    both = set(evictor.options) & set(quantizer.options)
    if both:  # no two methods share an option name today; refuse rather than guess if they ever do
        raise ValueError(f"option {sorted(both)[0]!r} belongs to both parts of {name!r}")
    unknown = set(options) - set(evictor.options) - set(quantizer.options)
    if unknown:
        valid = ", ".join([*evictor.options, *quantizer.options])
        raise ValueError(f"unknown option {sorted(unknown)[0]!r} for method {name!r}; valid: {valid}")
    quant = quantizer(**{k: v for k, v in options.items() if k in quantizer.options})
    method = evictor(compression=compression, budget=budget, **{k: v for k, v in options.items() if k in evictor.options})
    if method.trims_earlier_layers:  # some methods do only with some options (kvzip unless layerwise)
        raise ValueError(f"method {name!r}: {evictor.name} with these options compacts earlier layers again during "
                         f"prefill, which quantized blocks cannot follow; use {evictor.name} alone")
    if method.attention_bias is not None:  # an option that makes it (razorattention's compensation)
        raise ValueError(f"method {name!r}: {evictor.name} with these options weighs slots by a logit bias, which "
                         f"quantized blocks cannot carry; use {evictor.name} alone (or, for razorattention, compensation=false)")
    if quant.calibration:  # a calibrated quantizer (kvquant, kvtuner): its codec exists once its artifact is bound
        method.calibration, method.calibration_file = quant.calibration, quant.calibration_file

        def bind_calibration(artifact, method=method, quant=quant):
            quant.bind_calibration(artifact)
            method.quantization = quant.quantization

        method.name, method.bind_calibration = name, bind_calibration
        return method
    method.name, method.quantization = name, quant.quantization
    return method


def describe_methods() -> str:
    lines = []
    for name, m in METHODS.items():
        opts = ", ".join(f"{k}={d!r}" for k, (_, d, _, _) in m.options.items())
        lines.append(f"{name:14} {m.description}" + (f" [{opts}]" if opts else "") + (f" {m.paper}" if m.paper else ""))
    lines.append(f"{'A+B':14} an eviction method A, then quantization B of what it keeps (e.g. snapkv+kivi; "
                 f"options go to the method that has them)")
    return "\n".join(lines)
