package identity_test

import (
	"bytes"
	"crypto/ecdsa"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/fabric/pki"
)

var allFiles = []string{"ca.crt", "ca.key", "node.crt", "node.key", "gossip.key", "token", "cluster.json"}

func initID(t *testing.T, dir, node string) *identity.Identity {
	t.Helper()
	id, err := identity.Init(dir, node, []net.IP{net.ParseIP("127.0.0.1")})
	if err != nil {
		t.Fatalf("Init(%s, %s): %v", dir, node, err)
	}
	return id
}

func TestInitLoadRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data") // Init creates it
	id := initID(t, dir, "n1")

	if id.Node != "n1" || id.ClusterID != pki.ClusterID(id.CACert) || len(id.GossipKey) != identity.GossipKeySize {
		t.Fatalf("Init returned %+v", id)
	}
	if id.Token.CAFingerprint != pki.Fingerprint(id.CACert) {
		t.Errorf("token fingerprint %s is not the CA's %s", id.Token.CAFingerprint, pki.Fingerprint(id.CACert))
	}
	if err := id.NodeCert.CheckSignatureFrom(id.CACert); err != nil {
		t.Errorf("node certificate not signed by the CA: %v", err)
	}
	if len(id.NodeCert.IPAddresses) != 1 || !id.NodeCert.IPAddresses[0].Equal(net.ParseIP("127.0.0.1")) {
		t.Errorf("node certificate IPs = %v, want [127.0.0.1]", id.NodeCert.IPAddresses)
	}

	got, err := identity.Load(dir)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got.Node != id.Node || got.ClusterID != id.ClusterID || got.Token != id.Token {
		t.Errorf("Load = node %q cluster %q token %v; want %q %q %v", got.Node, got.ClusterID, got.Token, id.Node, id.ClusterID, id.Token)
	}
	if !got.Created.Equal(id.Created) {
		t.Errorf("Created = %v, want %v", got.Created, id.Created)
	}
	if !got.CACert.Equal(id.CACert) || !got.NodeCert.Equal(id.NodeCert) {
		t.Error("certificates changed across Save/Load")
	}
	if !bytes.Equal(got.GossipKey, id.GossipKey) {
		t.Error("gossip key changed across Save/Load")
	}
	if !got.NodeKey.Public().(*ecdsa.PublicKey).Equal(id.NodeKey.Public()) {
		t.Error("node key changed across Save/Load")
	}
	if !got.CAKey.Public().(*ecdsa.PublicKey).Equal(id.CAKey.Public()) {
		t.Error("CA key changed across Save/Load")
	}

	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o700 {
		t.Errorf("data dir mode %o, want 0700", perm)
	}
	for _, name := range allFiles {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("missing %s: %v", name, err)
			continue
		}
		if perm := st.Mode().Perm(); perm != 0o600 {
			t.Errorf("%s mode %o, want 0600", name, perm)
		}
	}
	// No temporary files left behind by the atomic writes.
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(allFiles) {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("data dir holds %v, want exactly %v", names, allFiles)
	}
}

func TestInitTightensExistingDirMode(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	initID(t, dir, "n1")
	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o700 {
		t.Errorf("data dir mode %o after Init, want 0700", perm)
	}
}

func TestInitTwiceFails(t *testing.T) {
	dir := t.TempDir()
	first := initID(t, dir, "n1")
	if _, err := identity.Init(dir, "n1", nil); err == nil {
		t.Fatal("second Init in the same dir succeeded")
	}
	if _, err := identity.Init(dir, "other", nil); err == nil {
		t.Fatal("second Init with another name in the same dir succeeded")
	}
	got, err := identity.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.ClusterID != first.ClusterID || got.Token != first.Token {
		t.Error("a refused Init changed the stored identity")
	}
}

func TestInitBadName(t *testing.T) {
	dir := t.TempDir()
	if _, err := identity.Init(dir, "bad name", nil); err == nil {
		t.Fatal("Init accepted an invalid node name")
	}
	if _, err := identity.Load(dir); !errors.Is(err, identity.ErrNoIdentity) {
		t.Errorf("after a refused Init, Load = %v; want ErrNoIdentity", err)
	}
}

func TestLoadEmptyDir(t *testing.T) {
	for name, dir := range map[string]string{
		"empty":   t.TempDir(),
		"missing": filepath.Join(t.TempDir(), "nope"),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := identity.Load(dir)
			if !errors.Is(err, identity.ErrNoIdentity) {
				t.Fatalf("Load(%s) = %v, want ErrNoIdentity", dir, err)
			}
		})
	}
}

// damage initialises a fresh identity dir, lets f damage it and returns
// the error of Load, which must fail without claiming there is no identity.
func damage(t *testing.T, f func(t *testing.T, dir string)) error {
	t.Helper()
	dir := t.TempDir()
	initID(t, dir, "n1")
	f(t, dir)
	id, err := identity.Load(dir)
	if err == nil {
		t.Fatalf("Load of a damaged dir succeeded: node %q cluster %q", id.Node, id.ClusterID)
	}
	if errors.Is(err, identity.ErrNoIdentity) {
		t.Errorf("a damaged identity is reported as no identity: %v", err)
	}
	return err
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestLoadRefusesInconsistentDir(t *testing.T) {
	otherDir := t.TempDir()
	initID(t, otherDir, "n1")

	tests := []struct {
		name    string
		modify  func(t *testing.T, dir string)
		wantAny []string // the error mentions one of these
	}{
		{
			name: "ca.crt of another cluster",
			modify: func(t *testing.T, dir string) {
				copyFile(t, filepath.Join(otherDir, "ca.crt"), filepath.Join(dir, "ca.crt"))
			},
			wantAny: []string{"different clusters", "not signed"},
		},
		{
			name: "ca.crt and token of another cluster",
			modify: func(t *testing.T, dir string) {
				copyFile(t, filepath.Join(otherDir, "ca.crt"), filepath.Join(dir, "ca.crt"))
				copyFile(t, filepath.Join(otherDir, "token"), filepath.Join(dir, "token"))
				copyFile(t, filepath.Join(otherDir, "cluster.json"), filepath.Join(dir, "cluster.json"))
			},
			wantAny: []string{"not signed"},
		},
		{
			name: "token of another cluster",
			modify: func(t *testing.T, dir string) {
				copyFile(t, filepath.Join(otherDir, "token"), filepath.Join(dir, "token"))
			},
			wantAny: []string{"different clusters"},
		},
		{
			name: "node.crt of another cluster",
			modify: func(t *testing.T, dir string) {
				copyFile(t, filepath.Join(otherDir, "node.crt"), filepath.Join(dir, "node.crt"))
			},
			wantAny: []string{"not signed"},
		},
		{
			name: "cluster.json names another node",
			modify: func(t *testing.T, dir string) {
				p := filepath.Join(dir, "cluster.json")
				b, err := os.ReadFile(p)
				if err != nil {
					t.Fatal(err)
				}
				b = bytes.Replace(b, []byte(`"n1"`), []byte(`"n2"`), 1)
				if err := os.WriteFile(p, b, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantAny: []string{"n2"},
		},
		{
			name: "truncated gossip.key",
			modify: func(t *testing.T, dir string) {
				p := filepath.Join(dir, "gossip.key")
				if err := os.Truncate(p, identity.GossipKeySize-1); err != nil {
					t.Fatal(err)
				}
			},
			wantAny: []string{"gossip.key"},
		},
		{
			name: "empty gossip.key",
			modify: func(t *testing.T, dir string) {
				if err := os.Truncate(filepath.Join(dir, "gossip.key"), 0); err != nil {
					t.Fatal(err)
				}
			},
			wantAny: []string{"gossip.key"},
		},
		{
			name: "node.key missing",
			modify: func(t *testing.T, dir string) {
				if err := os.Remove(filepath.Join(dir, "node.key")); err != nil {
					t.Fatal(err)
				}
			},
			wantAny: []string{"node.key"},
		},
		{
			name: "garbage ca.key",
			modify: func(t *testing.T, dir string) {
				if err := os.WriteFile(filepath.Join(dir, "ca.key"), []byte("garbage"), 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantAny: []string{"ca.key"},
		},
		{
			name: "garbage token",
			modify: func(t *testing.T, dir string) {
				if err := os.WriteFile(filepath.Join(dir, "token"), []byte("obx1.nope\n"), 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantAny: []string{"token"},
		},
		{
			name: "garbage cluster.json",
			modify: func(t *testing.T, dir string) {
				if err := os.WriteFile(filepath.Join(dir, "cluster.json"), []byte("{"), 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantAny: []string{"cluster.json"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := damage(t, tt.modify)
			for _, w := range tt.wantAny {
				if strings.Contains(err.Error(), w) {
					return
				}
			}
			t.Errorf("Load error %q mentions none of %q", err, tt.wantAny)
		})
	}
}

func TestLoadRefusesNodeKeyOfAnotherNode(t *testing.T) {
	err := damage(t, func(t *testing.T, dir string) {
		other := t.TempDir()
		initID(t, other, "n1")
		copyFile(t, filepath.Join(other, "node.key"), filepath.Join(dir, "node.key"))
	})
	if !strings.Contains(err.Error(), "key") {
		t.Errorf("error %q does not name the key", err)
	}
}

func TestLoadErrorOtherThanNotExist(t *testing.T) {
	// cluster.json that is a directory: not "no identity", a real error.
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "cluster.json"), 0o700); err != nil {
		t.Fatal(err)
	}
	_, err := identity.Load(dir)
	if err == nil || errors.Is(err, identity.ErrNoIdentity) || errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load = %v, want an error that is not ErrNoIdentity", err)
	}
}

func TestTLSCertificateCarriesTheCA(t *testing.T) {
	// A joining node pins the CA from the chain the server presents, so the
	// node certificate must travel with the CA certificate.
	id := initID(t, t.TempDir(), "n1")
	cert := id.TLSCertificate()
	if len(cert.Certificate) != 2 || !bytes.Equal(cert.Certificate[0], id.NodeCert.Raw) || !bytes.Equal(cert.Certificate[1], id.CACert.Raw) {
		t.Fatalf("TLSCertificate chain has %d entries; want [node, CA]", len(cert.Certificate))
	}
	if cert.Leaf != id.NodeCert {
		t.Error("TLSCertificate.Leaf is not the node certificate")
	}
	if got := id.CA(); got.Cert != id.CACert || got.Fingerprint() != id.Token.CAFingerprint {
		t.Error("CA() does not return the cluster CA")
	}
}
