from twisted.application.service import ServiceMaker

txregistry = ServiceMaker(
    "txregistry",
    "txregistry.tap",
    "A Docker/OCI registry pull-through cache.",
    "txregistry",
)
