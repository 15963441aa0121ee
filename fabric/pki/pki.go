// Package pki holds the cluster's cryptography: the cluster certificate
// authority, node certificates, the join token and the TLS configurations
// that make every agent-to-agent connection mutual TLS.
//
// Trust model: a cluster is its CA. A node proves membership by presenting a
// certificate signed by the CA; a joining node proves it may become a member
// by presenting the join token's secret, and it authenticates the cluster by
// the CA fingerprint carried in the same token (as kubeadm's
// discovery-token-ca-cert-hash does), so neither side trusts the network.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"strings"
	"time"
)

// Validity periods. Node certificates are long-lived because there is no
// rotation yet (see docs/ARCHITECTURE.md, "What is not done").
const (
	CAValidity   = 10 * 365 * 24 * time.Hour
	NodeValidity = 5 * 365 * 24 * time.Hour
)

// CA is the cluster certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// NewCA creates a fresh self-signed ECDSA P-256 CA for a cluster.
func NewCA() (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: generate CA key: %w", err)
	}
	serial, err := randSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "onebox cluster CA", Organization: []string{"onebox"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(CAValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("pki: create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: parse CA certificate: %w", err)
	}
	return &CA{Cert: cert, Key: key}, nil
}

// Fingerprint is the hex SHA-256 of the CA certificate's DER encoding.
func (ca *CA) Fingerprint() string { return Fingerprint(ca.Cert) }

// ClusterID is the short public name of the cluster: the first 16 hex digits
// of the CA fingerprint.
func (ca *CA) ClusterID() string { return ClusterID(ca.Cert) }

// Fingerprint returns the hex SHA-256 of a certificate's DER encoding.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// ClusterID returns the short cluster id derived from a CA certificate.
func ClusterID(ca *x509.Certificate) string { return Fingerprint(ca)[:16] }

// NewNodeKey generates a node's private key. It never leaves the node.
func NewNodeKey() (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: generate node key: %w", err)
	}
	return k, nil
}

// NewCSR makes a certificate request for node name, signed by key.
func NewCSR(key crypto.Signer, node string) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: node, Organization: []string{"onebox"}},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("pki: create CSR: %w", err)
	}
	return der, nil
}

// SignNode checks a CSR and issues a node certificate for it. The node name
// becomes the CommonName and a DNS SAN; ips become IP SANs. The certificate
// is valid for both server and client authentication: every agent is both.
func (ca *CA) SignNode(csrDER []byte, node string, ips []net.IP) ([]byte, error) {
	if err := ValidNodeName(node); err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("pki: parse CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("pki: CSR signature: %w", err)
	}
	if csr.Subject.CommonName != node {
		return nil, fmt.Errorf("pki: CSR is for %q, not %q", csr.Subject.CommonName, node)
	}
	serial, err := randSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: node, Organization: []string{"onebox"}},
		DNSNames:     []string{node},
		IPAddresses:  ips,
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(NodeValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, csr.PublicKey, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("pki: sign node certificate: %w", err)
	}
	return der, nil
}

// ValidNodeName reports whether s can name a node: 1-63 characters of
// letters, digits, '-', '_' and '.', starting with a letter or digit.
func ValidNodeName(s string) error {
	if len(s) == 0 || len(s) > 63 {
		return fmt.Errorf("pki: node name %q must be 1-63 characters", s)
	}
	for i, r := range s {
		alnum := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9'
		if alnum || (i > 0 && (r == '-' || r == '_' || r == '.')) {
			continue
		}
		return fmt.Errorf("pki: node name %q: only letters, digits, '-', '_' and '.' are allowed, starting with a letter or digit", s)
	}
	return nil
}

func randSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("pki: serial: %w", err)
	}
	return n, nil
}

// Token is what a new node needs to join: the cluster CA's fingerprint (to
// authenticate the cluster) and a shared secret (to be authenticated by it).
type Token struct {
	CAFingerprint string // 64 hex digits
	Secret        string // 32 hex digits
}

const tokenPrefix = "obx1"

// NewToken makes a token for the CA with a fresh 128-bit secret.
func NewToken(ca *x509.Certificate) (Token, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return Token{}, fmt.Errorf("pki: token secret: %w", err)
	}
	return Token{CAFingerprint: Fingerprint(ca), Secret: hex.EncodeToString(b)}, nil
}

// String renders the token as obx1.<ca-fingerprint>.<secret>.
func (t Token) String() string { return tokenPrefix + "." + t.CAFingerprint + "." + t.Secret }

// ClusterID is the short id of the cluster the token belongs to.
func (t Token) ClusterID() string { return t.CAFingerprint[:16] }

// ErrBadToken is returned for a token that does not parse.
var ErrBadToken = errors.New("pki: malformed join token (expected obx1.<64 hex>.<32 hex>, as printed by 'onebox init')")

// ParseToken parses a token string. It is strict: the token arrives from
// users and command lines, and a typo must not turn into a confusing
// handshake failure later.
func ParseToken(s string) (Token, error) {
	parts := strings.Split(strings.TrimSpace(s), ".")
	if len(parts) != 3 || parts[0] != tokenPrefix || !isHex(parts[1], 64) || !isHex(parts[2], 32) {
		return Token{}, ErrBadToken
	}
	return Token{CAFingerprint: strings.ToLower(parts[1]), Secret: strings.ToLower(parts[2])}, nil
}

// SecretMatches compares a presented secret with the token's in constant time.
func (t Token) SecretMatches(secret string) bool {
	return subtle.ConstantTimeCompare([]byte(strings.ToLower(secret)), []byte(t.Secret)) == 1
}

func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

// EncodeCertPEM and friends convert between DER and PEM for storage.
func EncodeCertPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// EncodeKeyPEM encodes a private key as PKCS#8 PEM.
func EncodeKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("pki: marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParseCertPEM parses one PEM certificate.
func ParseCertPEM(b []byte) (*x509.Certificate, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("pki: no PEM certificate found")
	}
	return x509.ParseCertificate(blk.Bytes)
}

// ParseKeyPEM parses one PKCS#8 PEM private key.
func ParseKeyPEM(b []byte) (crypto.Signer, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, errors.New("pki: no PEM private key found")
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("pki: parse key: %w", err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("pki: key cannot sign")
	}
	return s, nil
}

// Protocols negotiated by ALPN on the fabric port. The join protocol is the
// only one served to a client without a cluster certificate.
const (
	ProtoJoin    = "onebox-join/1"
	ProtoControl = "http/1.1"
	// ProtoProc carries a process's stdio and signals between agents
	// (proc/stream); members only, like the control API.
	ProtoProc = "onebox-proc/1"
	// ProtoService carries connections to exposed services (service/proxy).
	ProtoService = "onebox-svc/1"
	// ProtoPage carries memory pool pages between agents (memory/pageproto).
	ProtoPage = "onebox-page/1"
)

// ServerTLS is the fabric port's TLS configuration. A client that offers
// ProtoJoin gets a server-authenticated session for the join exchange only;
// every other client must present a certificate signed by the cluster CA,
// checked during the handshake, before a single byte of any other protocol
// is read.
func ServerTLS(node tls.Certificate, ca *x509.Certificate) *tls.Config {
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	base := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{node},
		ClientCAs:    pool,
	}
	join := base.Clone()
	join.ClientAuth = tls.NoClientCert
	join.NextProtos = []string{ProtoJoin}
	member := base.Clone()
	member.ClientAuth = tls.RequireAndVerifyClientCert
	member.NextProtos = []string{ProtoControl, ProtoProc, ProtoService, "onebox-fs/1" /* cfs/proto.ALPN */, ProtoPage}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{node},
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			for _, p := range hello.SupportedProtos {
				if p == ProtoJoin {
					return join, nil
				}
			}
			return member, nil
		},
	}
}

// ClientTLS is the configuration for a member dialing another member: it
// presents its node certificate and accepts only peers signed by the CA.
// The peer's name is not checked against the dialed address (nodes move and
// are dialed by IP); callers that expect a specific node compare
// PeerName of the connection state.
func ClientTLS(node tls.Certificate, ca *x509.Certificate) *tls.Config {
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		Certificates:       []tls.Certificate{node},
		NextProtos:         []string{ProtoControl},
		InsecureSkipVerify: true, // replaced by VerifyPeerCertificate: chain to the CA, no hostname
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			return verifyChain(raw, pool)
		},
	}
}

// JoinTLS is the configuration for a node that holds only a token: it trusts
// the server if and only if the server's chain ends in a CA whose
// fingerprint is the token's.
func JoinTLS(t Token) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		NextProtos:         []string{ProtoJoin},
		InsecureSkipVerify: true, // replaced by the CA pin below
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			for _, der := range raw[min(1, len(raw)):] {
				c, err := x509.ParseCertificate(der)
				if err != nil || Fingerprint(c) != t.CAFingerprint {
					continue
				}
				pool := x509.NewCertPool()
				pool.AddCert(c)
				return verifyChain(raw, pool)
			}
			return ErrWrongCluster
		},
	}
}

// ErrWrongCluster is returned when a peer's certificate is not from the
// expected cluster CA.
var ErrWrongCluster = errors.New("pki: peer is not a member of this cluster (its certificate is not signed by the cluster CA the token names)")

func verifyChain(raw [][]byte, roots *x509.CertPool) error {
	if len(raw) == 0 {
		return errors.New("pki: peer sent no certificate")
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return fmt.Errorf("pki: peer certificate: %w", err)
	}
	_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrWrongCluster, err)
	}
	return nil
}

// PeerName returns the node name in a verified peer certificate.
func PeerName(cs tls.ConnectionState) string {
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	return cs.PeerCertificates[0].Subject.CommonName
}
