// Package join admits new nodes into a cluster. A joining node that holds
// only the join token dials any member's fabric port offering the join ALPN
// protocol, pins the cluster CA by the fingerprint in the token, and sends
// the token's secret with a certificate request for its node name. The
// member checks the secret and the name, signs the request with the cluster
// CA and answers with the node certificate and the cluster's secrets. The
// private key never leaves the joining node.
//
// Wire format: one request frame and one response frame, each a 4-byte
// big-endian length followed by that many bytes of JSON, at most MaxFrame.
package join

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/fabric/pki"
)

// MaxFrame bounds a join frame; anything longer is refused before it is read.
const MaxFrame = 64 << 10

// Version is the join protocol version.
const Version = 1

// Timeout bounds a whole join exchange on both sides.
const Timeout = 10 * time.Second

// Request is what a joining node sends.
type Request struct {
	Version int      `json:"version"`
	Node    string   `json:"node"`
	Secret  string   `json:"secret"`
	CSR     []byte   `json:"csr"`
	IPs     []string `json:"ips,omitempty"`
}

// Refusal codes, so the joining side can tell the user what to do.
const (
	CodeBadToken   = "bad_token"
	CodeNameTaken  = "name_taken"
	CodeBadRequest = "bad_request"
	CodeInternal   = "internal"
)

// Response is what the admitting member answers.
type Response struct {
	Error     string   `json:"error,omitempty"`
	Code      string   `json:"code,omitempty"`
	Cert      []byte   `json:"cert,omitempty"`
	CACert    []byte   `json:"ca_cert,omitempty"`
	CAKey     []byte   `json:"ca_key,omitempty"` // PKCS#8 PEM
	GossipKey []byte   `json:"gossip_key,omitempty"`
	Token     string   `json:"token,omitempty"`
	Peers     []string `json:"peers,omitempty"` // gossip addresses of live members
}

// WriteFrame writes v as one length-prefixed JSON frame.
func WriteFrame(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > MaxFrame {
		return fmt.Errorf("join: frame of %d bytes exceeds %d", len(b), MaxFrame)
	}
	buf := make([]byte, 4+len(b))
	binary.BigEndian.PutUint32(buf, uint32(len(b)))
	copy(buf[4:], b)
	_, err = w.Write(buf)
	return err
}

// ReadFrame reads one length-prefixed frame's payload.
func ReadFrame(r io.Reader) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("join: read frame header: %w", err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 || n > MaxFrame {
		return nil, fmt.Errorf("join: frame length %d out of range 1..%d", n, MaxFrame)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("join: truncated frame: %w", err)
	}
	return b, nil
}

// DecodeRequest parses and validates a request payload. It is the decoder
// of untrusted network input on the join path.
func DecodeRequest(b []byte) (Request, error) {
	var req Request
	if err := json.Unmarshal(b, &req); err != nil {
		return Request{}, fmt.Errorf("join: malformed request: %w", err)
	}
	if req.Version != Version {
		return Request{}, fmt.Errorf("join: protocol version %d not supported (want %d): upgrade onebox on the older node", req.Version, Version)
	}
	if err := pki.ValidNodeName(req.Node); err != nil {
		return Request{}, err
	}
	if len(req.CSR) == 0 {
		return Request{}, errors.New("join: request has no certificate request")
	}
	if len(req.IPs) > 64 {
		return Request{}, errors.New("join: too many IP addresses")
	}
	for _, s := range req.IPs {
		if net.ParseIP(s) == nil {
			return Request{}, fmt.Errorf("join: bad IP address %q", s)
		}
	}
	return req, nil
}

// Server admits nodes on behalf of a member.
type Server struct {
	Identity *identity.Identity
	// NameTaken reports whether a live member other than the requester
	// already uses the name, and its address.
	NameTaken func(node string) (addr string, taken bool)
	// Peers returns gossip addresses of live members to hand to the new node.
	Peers  func() []string
	Logger *slog.Logger
	// Result, if set, is called with the outcome code ("ok", a Code*, or
	// "busy" when MaxConcurrent exchanges are already running).
	Result func(code string)

	once     sync.Once
	slots    chan struct{}
	mu       sync.Mutex
	lastWarn time.Time // guarded by mu
}

// MaxConcurrent bounds join exchanges in progress: each holds a connection
// and a goroutine for up to Timeout, and anyone may open one.
const MaxConcurrent = 16

// ServeConn runs one join exchange on an established TLS connection whose
// negotiated protocol is pki.ProtoJoin, and closes it.
func (s *Server) ServeConn(conn net.Conn) {
	defer conn.Close()
	s.once.Do(func() { s.slots = make(chan struct{}, MaxConcurrent) })
	select {
	case s.slots <- struct{}{}:
		defer func() { <-s.slots }()
	default:
		if s.Result != nil {
			s.Result("busy")
		}
		return
	}
	_ = conn.SetDeadline(time.Now().Add(Timeout))
	resp, node := s.handle(conn)
	code := "ok"
	if resp.Error != "" {
		code = resp.Code
		// Anyone can send a malformed request: that is debug noise. Wrong
		// tokens and taken names are worth a warning, at most one a second.
		if resp.Code == CodeBadRequest || !s.warnAllowed() {
			s.Logger.Debug("join refused", "remote", conn.RemoteAddr().String(), "node", node, "code", resp.Code, "reason", resp.Error)
		} else {
			s.Logger.Warn("join refused", "remote", conn.RemoteAddr().String(), "node", node, "code", resp.Code, "reason", resp.Error)
		}
	} else {
		s.Logger.Info("node admitted", "remote", conn.RemoteAddr().String(), "node", node)
	}
	if s.Result != nil {
		s.Result(code)
	}
	if err := WriteFrame(conn, resp); err != nil {
		s.Logger.Debug("join: write response", "err", err)
	}
}

func (s *Server) warnAllowed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if now := time.Now(); now.Sub(s.lastWarn) >= time.Second {
		s.lastWarn = now
		return true
	}
	return false
}

func (s *Server) handle(r io.Reader) (Response, string) {
	refuse := func(code, format string, a ...any) Response {
		return Response{Code: code, Error: fmt.Sprintf(format, a...)}
	}
	b, err := ReadFrame(r)
	if err != nil {
		return refuse(CodeBadRequest, "%v", err), ""
	}
	req, err := DecodeRequest(b)
	if err != nil {
		return refuse(CodeBadRequest, "%v", err), req.Node
	}
	if !s.Identity.Token.SecretMatches(req.Secret) {
		return refuse(CodeBadToken, "invalid join token"), req.Node
	}
	if s.NameTaken != nil {
		if addr, taken := s.NameTaken(req.Node); taken {
			return refuse(CodeNameTaken, "node name %q is already used by a live member at %s: choose another --name", req.Node, addr), req.Node
		}
	}
	var ips []net.IP
	for _, s := range req.IPs {
		ips = append(ips, net.ParseIP(s))
	}
	der, err := s.Identity.CA().SignNode(req.CSR, req.Node, ips)
	if err != nil {
		return refuse(CodeBadRequest, "%v", err), req.Node
	}
	caKey, err := pki.EncodeKeyPEM(s.Identity.CAKey)
	if err != nil {
		return refuse(CodeInternal, "%v", err), req.Node
	}
	resp := Response{
		Cert: der, CACert: s.Identity.CACert.Raw, CAKey: caKey,
		GossipKey: s.Identity.GossipKey, Token: s.Identity.Token.String(),
	}
	if s.Peers != nil {
		resp.Peers = s.Peers()
	}
	return resp, req.Node
}

// RefusedError is a join refused by the cluster, with the member's reason.
type RefusedError struct {
	Addr, Code, Reason string
}

func (e *RefusedError) Error() string {
	hint := ""
	if e.Code == CodeBadToken {
		hint = " (check the token: 'onebox init' printed it, and it is in any member's data dir as 'token')"
	}
	return fmt.Sprintf("join refused by %s: %s%s", e.Addr, e.Reason, hint)
}

// Dial performs the join exchange with the member at addr and returns the
// new identity (not yet saved) and the gossip peers to contact.
func Dial(ctx context.Context, addr string, tok pki.Token, node string, ips []net.IP) (*identity.Identity, []string, error) {
	ctx, cancel := context.WithTimeout(ctx, Timeout)
	defer cancel()
	key, err := pki.NewNodeKey()
	if err != nil {
		return nil, nil, err
	}
	csr, err := pki.NewCSR(key, node)
	if err != nil {
		return nil, nil, err
	}
	d := tls.Dialer{Config: pki.JoinTLS(tok)}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		if errors.Is(err, pki.ErrWrongCluster) {
			return nil, nil, fmt.Errorf("join %s: the node there belongs to another cluster than the token's (cluster %s)", addr, tok.ClusterID())
		}
		return nil, nil, fmt.Errorf("join %s: %w", addr, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	req := Request{Version: Version, Node: node, Secret: tok.Secret, CSR: csr}
	for _, ip := range ips {
		req.IPs = append(req.IPs, ip.String())
	}
	if err := WriteFrame(conn, req); err != nil {
		return nil, nil, fmt.Errorf("join %s: send request: %w", addr, err)
	}
	b, err := ReadFrame(conn)
	if err != nil {
		return nil, nil, fmt.Errorf("join %s: %w", addr, err)
	}
	var resp Response
	if err := json.Unmarshal(b, &resp); err != nil {
		return nil, nil, fmt.Errorf("join %s: malformed response: %w", addr, err)
	}
	if resp.Error != "" {
		return nil, nil, &RefusedError{Addr: addr, Code: resp.Code, Reason: resp.Error}
	}
	id, err := identityFrom(resp, tok, node, key)
	if err != nil {
		return nil, nil, fmt.Errorf("join %s: %w", addr, err)
	}
	return id, resp.Peers, nil
}

func identityFrom(resp Response, tok pki.Token, node string, key *ecdsa.PrivateKey) (*identity.Identity, error) {
	ca, err := x509.ParseCertificate(resp.CACert)
	if err != nil {
		return nil, fmt.Errorf("bad CA certificate: %w", err)
	}
	if pki.Fingerprint(ca) != tok.CAFingerprint {
		return nil, pki.ErrWrongCluster
	}
	cert, err := x509.ParseCertificate(resp.Cert)
	if err != nil {
		return nil, fmt.Errorf("bad node certificate: %w", err)
	}
	if err := cert.CheckSignatureFrom(ca); err != nil {
		return nil, fmt.Errorf("node certificate not signed by the cluster CA: %w", err)
	}
	caKey, err := pki.ParseKeyPEM(resp.CAKey)
	if err != nil {
		return nil, err
	}
	t, err := pki.ParseToken(resp.Token)
	if err != nil {
		return nil, err
	}
	if len(resp.GossipKey) != identity.GossipKeySize {
		return nil, errors.New("bad gossip key")
	}
	if pub, ok := cert.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(&key.PublicKey) {
		return nil, errors.New("node certificate is not for our key")
	}
	if cert.Subject.CommonName != node {
		return nil, fmt.Errorf("node certificate is for %q, not %q", cert.Subject.CommonName, node)
	}
	return &identity.Identity{
		Node: node, ClusterID: pki.ClusterID(ca), CACert: ca, CAKey: caKey, NodeCert: cert, NodeKey: key,
		GossipKey: resp.GossipKey, Token: t, Created: time.Now().UTC(),
	}, nil
}
