"""Query regions in the Python library, the CLI and the contact sheet, without a server."""

from argparse import Namespace

import numpy as np
import pytest
from PIL import Image

from client import Cropped
from client.cli import _sheet, main
from client.library import _embed_request, _recommend_request, _similar_request, region_message
from client.sheet import REGION_COLOUR, TILE, contact_sheet
from lookalike.preprocess import crop, decode


def test_a_region_goes_with_every_kind_of_image_query(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.png")
    request = _similar_request(image=tmp_path / "x.png", region=(0.1, 0.2, 0.6, 0.9))
    assert request.HasField("region") and request.region.x_max == pytest.approx(0.6)
    assert not _similar_request(image=tmp_path / "x.png").HasField("region")
    embed = _embed_request([tmp_path / "x.png"] * 2, [(0, 0, 1, 1), (0.5, 0.5, 1, 1)])
    assert [r.x_min for r in embed.regions] == [0, 0.5] and not _embed_request(tmp_path / "x.png", None).regions
    recommend = _recommend_request(Cropped(tmp_path / "x.png", (0.1, 0.2, 0.6, 0.9)), (), "average_vector", 5, (),
                                   (), None, False, 0, False, 0)
    assert recommend.positive[0].WhichOneof("example") == "image"
    assert recommend.positive[0].region.y_max == pytest.approx(0.9)


@pytest.mark.parametrize(("region", "message"), [((0.5, 0.2, 0.5, 0.9), "is empty"),
                                                 ((0.1, 0.2, 1.5, 0.9), "is out of range"),
                                                 ((0.1, 0.2), "four numbers")])
def test_a_wrong_region_fails_before_any_call(region, message):
    with pytest.raises(ValueError, match=message):
        region_message(region)


def test_region_misuse_fails_before_any_call(tmp_path):
    with pytest.raises(ValueError, match="region applies to an image query only"):
        _similar_request(product_id="P1", region=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="1 regions for 2 images"):
        _embed_request([b"a", b"b"], [(0, 0, 1, 1)])


def test_cli_region_mistakes_are_one_line(tmp_path, capsys):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as exit_:
        main(["--address", "127.0.0.1:1", "similar", str(tmp_path / "x.png"), "--region", "0.1,0.2"])
    assert exit_.value.code == 2
    assert "is not X_MIN,Y_MIN,X_MAX,Y_MAX" in capsys.readouterr().err
    for args, message in ((["similar", "--product", "P1", "--region", "0.1,0.2,0.6,0.9"], "image query only"),
                          (["similar", str(tmp_path / "x.png"), "--region", "0.6,0.2,0.1,0.9"], "is empty"),
                          (["recommend", "--positive", "P1", "--region", "0.1,0.2,0.6,0.9"],
                           "--region applies to --positive-image")):
        assert main(["--address", "127.0.0.1:1", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_contact_sheet_outlines_the_region_on_the_query_tile(tmp_path):
    out = contact_sheet(Image.new("RGB", (100, 100), "white"), ["query"], [], tmp_path / "sheet.png",
                        query_region=(0.25, 0.5, 0.75, 1.0))
    pixels = np.asarray(Image.open(out).convert("RGB"))[:TILE, :TILE]
    blue = np.argwhere(np.all(pixels == REGION_COLOUR, axis=2))
    # The thumbnail is 152 px wide at (4, 4): the box spans x 42..117 and y 80..155.
    assert blue[:, 1].min() == 42 and blue[:, 1].max() == 117
    assert blue[:, 0].min() == 80 and blue[:, 0].max() == 155
    plain = np.asarray(Image.open(contact_sheet(Image.new("RGB", (100, 100), "white"), ["query"], [],
                                                tmp_path / "plain.png")).convert("RGB"))
    assert not np.all(plain == REGION_COLOUR, axis=2).any()


def test_the_contact_sheet_outlines_the_pixels_the_server_crops_from_a_rotated_photo(tmp_path):
    """A camera's portrait photo is stored landscape with EXIF orientation 6; the server turns it upright before
    cropping, so the sheet's outline must lie on the upright photo too: over the red half, not across both."""
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40], pixels[:, 40:] = (255, 0, 0), (0, 0, 255)  # stored: left red, right blue; upright: top red
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    photo = tmp_path / "portrait.jpg"
    image.save(photo, "JPEG", exif=exif, quality=95)
    region = (0.0, 0.0, 1.0, 0.5)
    served = crop(decode(photo.read_bytes()), region).reshape(-1, 3).mean(axis=0)
    assert served == pytest.approx((255, 0, 0), abs=8)
    args = Namespace(command="similar", image=photo, image_id=None, product=None, catalogue=None, region=region,
                     sheet=tmp_path / "sheet.png")
    _sheet(None, args, [])
    tile = np.asarray(Image.open(args.sheet).convert("RGB"))[:TILE, :TILE]
    ys, xs = np.nonzero(np.all(tile == REGION_COLOUR, axis=2))
    inside = tile[ys.min() + 3:ys.max() - 2, xs.min() + 3:xs.max() - 2].reshape(-1, 3).astype(float)
    assert inside.mean(axis=0) == pytest.approx(served, abs=8)
    assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 1  # the upright 40 x 80 photo's top half: square
