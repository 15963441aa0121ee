// Package lint checks project-wide conventions that the compiler does not:
// every package says what it is, in exactly one package doc comment.
package lint
