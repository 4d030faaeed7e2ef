"""The frozen network: :class:`NormNet`, every stage type it is made of, its metadata records, its file format and
its ONNX export. Importing this package registers every stage type, so :meth:`NormNet.load` knows them all."""

from .conv import FixedOp, NormConv2d, ResidualStage
from .conv_stream import ConvStream
from .factorised import FactorisedEmbedding, FactorisedLinear, FactorisedTable
from .linear import NormLinear
from .normnet import NormNet
from .pretrained import PretrainedConv2d, PretrainedLinear
from .records import NetMeta, SolveInfo, SolveRecord
from .seqnet import ConstStage, LayerNormStage, PretrainedMap, SeqNet
from .stage import STAGES, Stage, register_stage
from .stream import ResidualStream
from .summary import NetSummary
from .tied import TiedResidualStream
from .tied_conv import TiedConvStream

__all__ = [
    "NormNet",
    "NetSummary",
    "Stage",
    "STAGES",
    "register_stage",
    "NormLinear",
    "NormConv2d",
    "FixedOp",
    "ResidualStage",
    "ResidualStream",
    "ConvStream",
    "TiedResidualStream",
    "TiedConvStream",
    "PretrainedLinear",
    "PretrainedConv2d",
    "FactorisedLinear",
    "FactorisedEmbedding",
    "FactorisedTable",
    "LayerNormStage",
    "ConstStage",
    "SeqNet",
    "PretrainedMap",
    "NetMeta",
    "SolveInfo",
    "SolveRecord",
]
