// Package identity stores a node's cluster identity in its data directory:
// the cluster CA, the node certificate and key, the gossip key and the join
// token. Secrets are written with mode 0600 in a 0700 directory, atomically,
// so a crash never leaves half an identity behind.
package identity

import (
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/onebox-project/onebox/fabric/pki"
)

// File names inside the data directory.
const (
	fileCACert   = "ca.crt"
	fileCAKey    = "ca.key"
	fileNodeCert = "node.crt"
	fileNodeKey  = "node.key"
	fileGossip   = "gossip.key"
	fileToken    = "token"
	fileCluster  = "cluster.json"
)

// GossipKeySize is the AES-256 key length memberlist uses to encrypt gossip.
const GossipKeySize = 32

// Identity is everything a member needs to take part in the cluster.
type Identity struct {
	Node      string
	ClusterID string
	CACert    *x509.Certificate
	CAKey     crypto.Signer // every member holds it so any member can admit new nodes
	NodeCert  *x509.Certificate
	NodeKey   crypto.Signer
	GossipKey []byte
	Token     pki.Token
	Created   time.Time
}

// ErrNoIdentity means the data directory has never been initialised or joined.
var ErrNoIdentity = errors.New("identity: data directory holds no cluster identity")

type clusterFile struct {
	ClusterID string    `json:"cluster_id"`
	Node      string    `json:"node"`
	Created   time.Time `json:"created"`
}

// Init creates a new cluster: a CA, a gossip key, a join token and this
// node's certificate, and saves them in dir. It refuses to overwrite an
// existing identity.
func Init(dir, node string, ips []net.IP) (*Identity, error) {
	if err := pki.ValidNodeName(node); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(dir, fileCluster)); err == nil {
		return nil, fmt.Errorf("identity: %s already holds a cluster identity; use another --data-dir or remove it first", dir)
	}
	ca, err := pki.NewCA()
	if err != nil {
		return nil, err
	}
	tok, err := pki.NewToken(ca.Cert)
	if err != nil {
		return nil, err
	}
	gk := make([]byte, GossipKeySize)
	if _, err := rand.Read(gk); err != nil {
		return nil, fmt.Errorf("identity: gossip key: %w", err)
	}
	key, err := pki.NewNodeKey()
	if err != nil {
		return nil, err
	}
	csr, err := pki.NewCSR(key, node)
	if err != nil {
		return nil, err
	}
	der, err := ca.SignNode(csr, node, ips)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	id := &Identity{
		Node: node, ClusterID: ca.ClusterID(), CACert: ca.Cert, CAKey: ca.Key,
		NodeCert: cert, NodeKey: key, GossipKey: gk, Token: tok, Created: time.Now().UTC(),
	}
	return id, id.Save(dir)
}

// Save writes the identity to dir. The cluster file is written last: its
// presence marks a complete identity.
func (id *Identity) Save(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("identity: create data dir: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	caKey, err := pki.EncodeKeyPEM(id.CAKey)
	if err != nil {
		return err
	}
	nodeKey, err := pki.EncodeKeyPEM(id.NodeKey)
	if err != nil {
		return err
	}
	cf, _ := json.MarshalIndent(clusterFile{ClusterID: id.ClusterID, Node: id.Node, Created: id.Created}, "", "  ")
	files := []struct {
		name string
		data []byte
	}{
		{fileCACert, pki.EncodeCertPEM(id.CACert.Raw)},
		{fileCAKey, caKey},
		{fileNodeCert, pki.EncodeCertPEM(id.NodeCert.Raw)},
		{fileNodeKey, nodeKey},
		{fileGossip, id.GossipKey},
		{fileToken, []byte(id.Token.String() + "\n")},
		{fileCluster, append(cf, '\n')},
	}
	for _, f := range files {
		if err := writeFileAtomic(filepath.Join(dir, f.name), f.data); err != nil {
			return err
		}
	}
	return nil
}

// Load reads the identity in dir. It returns ErrNoIdentity (wrapped) when
// there is none, and a descriptive error when the files are inconsistent:
// a data directory must never silently mix two clusters.
func Load(dir string) (*Identity, error) {
	cfb, err := os.ReadFile(filepath.Join(dir, fileCluster))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w (%s)", ErrNoIdentity, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	var cf clusterFile
	if err := json.Unmarshal(cfb, &cf); err != nil {
		return nil, fmt.Errorf("identity: %s: %w", filepath.Join(dir, fileCluster), err)
	}
	read := func(name string) ([]byte, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("identity: incomplete data dir: %w", err)
		}
		return b, nil
	}
	id := &Identity{Node: cf.Node, ClusterID: cf.ClusterID, Created: cf.Created}
	var b []byte
	if b, err = read(fileCACert); err != nil {
		return nil, err
	}
	if id.CACert, err = pki.ParseCertPEM(b); err != nil {
		return nil, fmt.Errorf("identity: %s: %w", fileCACert, err)
	}
	if b, err = read(fileCAKey); err != nil {
		return nil, err
	}
	if id.CAKey, err = pki.ParseKeyPEM(b); err != nil {
		return nil, fmt.Errorf("identity: %s: %w", fileCAKey, err)
	}
	if b, err = read(fileNodeCert); err != nil {
		return nil, err
	}
	if id.NodeCert, err = pki.ParseCertPEM(b); err != nil {
		return nil, fmt.Errorf("identity: %s: %w", fileNodeCert, err)
	}
	if b, err = read(fileNodeKey); err != nil {
		return nil, err
	}
	if id.NodeKey, err = pki.ParseKeyPEM(b); err != nil {
		return nil, fmt.Errorf("identity: %s: %w", fileNodeKey, err)
	}
	if id.GossipKey, err = read(fileGossip); err != nil {
		return nil, err
	}
	if len(id.GossipKey) != GossipKeySize {
		return nil, fmt.Errorf("identity: %s: want %d bytes, have %d", fileGossip, GossipKeySize, len(id.GossipKey))
	}
	if b, err = read(fileToken); err != nil {
		return nil, err
	}
	if id.Token, err = pki.ParseToken(string(b)); err != nil {
		return nil, fmt.Errorf("identity: %s: %w", fileToken, err)
	}
	if err := id.check(); err != nil {
		return nil, fmt.Errorf("identity: %s: %w", dir, err)
	}
	return id, nil
}

func (id *Identity) check() error {
	if pki.ClusterID(id.CACert) != id.ClusterID || id.Token.CAFingerprint != pki.Fingerprint(id.CACert) {
		return errors.New("files belong to different clusters")
	}
	if err := id.NodeCert.CheckSignatureFrom(id.CACert); err != nil {
		return fmt.Errorf("node certificate is not signed by the cluster CA: %w", err)
	}
	if pub, ok := id.NodeCert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(id.NodeKey.Public()) {
		return errors.New("node.key does not match node.crt")
	}
	if id.NodeCert.Subject.CommonName != id.Node {
		return fmt.Errorf("node certificate is for %q, cluster.json says %q", id.NodeCert.Subject.CommonName, id.Node)
	}
	return nil
}

// CA returns the cluster CA held by this node.
func (id *Identity) CA() *pki.CA { return &pki.CA{Cert: id.CACert, Key: id.CAKey} }

// TLSCertificate is the node certificate with the CA appended, so a joining
// node can pin the CA from the chain.
func (id *Identity) TLSCertificate() tls.Certificate {
	return tls.Certificate{
		Certificate: [][]byte{id.NodeCert.Raw, id.CACert.Raw},
		PrivateKey:  id.NodeKey,
		Leaf:        id.NodeCert,
	}
}

// ServerTLS and ClientTLS are the fabric TLS configurations for this node.
func (id *Identity) ServerTLS() *tls.Config { return pki.ServerTLS(id.TLSCertificate(), id.CACert) }

// ClientTLS is the configuration for dialing other members.
func (id *Identity) ClientTLS() *tls.Config { return pki.ClientTLS(id.TLSCertificate(), id.CACert) }

func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("identity: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("identity: write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("identity: sync %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	return nil
}
