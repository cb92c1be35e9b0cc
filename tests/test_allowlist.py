"""The one approval check both gates use (hospital: before a ClientApp bundle is unpacked;
server: before a ServerApp bundle is), and how each words a refusal."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.allowlist import AllowListUnreadable, AppNotApproved, approve, bundle_hash, check_approved
from client.operations.gate import approved_bundle
from server.operations.gate import check_bundle

BUNDLE, OTHER = b"PK\x03\x04 an approved bundle", b"PK\x03\x04 someone else's bundle"


def test_check_approved(tmp_path):
    path = tmp_path / "approved-apps.yaml"
    assert check_approved(path, BUNDLE) == (False, bundle_hash(BUNDLE))  # no list: nothing is approved
    assert approve(path, bundle_hash(BUNDLE), "reviewed", "this server")
    assert check_approved(path, BUNDLE) == (True, bundle_hash(BUNDLE))
    assert check_approved(path, OTHER) == (False, bundle_hash(OTHER))
    path.write_text("approved: [unclosed\n")
    with pytest.raises(AllowListUnreadable):
        check_approved(path, BUNDLE)


def test_each_gate_words_its_refusal(tmp_path):
    path = tmp_path / "approved-apps.yaml"
    approve(path, bundle_hash(BUNDLE))
    site = SimpleNamespace(site="site-x", require_approval=True, approved_apps=path)
    assert approved_bundle(site, BUNDLE) == bundle_hash(BUNDLE) and check_bundle(path, BUNDLE) == bundle_hash(BUNDLE)
    with pytest.raises(AppNotApproved, match="is not approved by hospital site-x"):
        approved_bundle(site, OTHER)
    with pytest.raises(AppNotApproved, match="is not approved on this server"):
        check_bundle(path, OTHER)
    path.write_text("approved: [unclosed\n")
    with pytest.raises(AppNotApproved) as refused:  # the reply goes to the server: it names no local path
        approved_bundle(site, BUNDLE)
    assert "cannot read its app allow-list" in str(refused.value) and str(tmp_path) not in str(refused.value)
    with pytest.raises(AppNotApproved, match="the server cannot read its app allow-list"):
        check_bundle(path, BUNDLE)
    site.require_approval = False  # a hospital that turned approval off runs what it is sent
    assert approved_bundle(site, OTHER) == bundle_hash(OTHER)
