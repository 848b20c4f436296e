"""Command-line flags of the One More Step extension (loaded by the WebUI before it parses its arguments)."""


def preload(parser):
    parser.add_argument(
        "--oms-models-dir",
        type=str,
        default=None,
        help="One More Step: an extra folder of OMS modules (searched after <models>/oms)",
    )
    parser.add_argument(
        "--oms-no-download",
        action="store_true",
        help="One More Step: never download a missing module or text encoder (place them by hand: models/README.md)",
    )
