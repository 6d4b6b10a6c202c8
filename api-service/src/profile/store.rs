//! Profiles in SQLite.

use async_trait::async_trait;
use shared::WriteTurn;
use sqlx::SqlitePool;

use super::{Profile, ProfilePatch, ProfileStore};
use crate::db::db_error;
use crate::error::ApiError;
use crate::time::{Millis, now_millis};

/// The SQLite profile store.
#[derive(Debug, Clone)]
pub struct SqliteProfiles {
    pool: SqlitePool,
    /// The turn to write, shared with the database's other writers in this process.
    turn: WriteTurn,
}

impl SqliteProfiles {
    /// Profiles on `pool`, each write in its `turn`.
    pub fn new(pool: SqlitePool, turn: WriteTurn) -> Self {
        Self { pool, turn }
    }
}

type Row = (String, Option<String>, Option<String>, Millis, Millis);

fn profile((openid, nickname, avatar_url, created_at, updated_at): Row) -> Profile {
    Profile {
        openid,
        nickname,
        avatar_url,
        created_at,
        updated_at,
    }
}

#[async_trait]
impl ProfileStore for SqliteProfiles {
    async fn get_or_create(&self, openid: &str) -> Result<Profile, ApiError> {
        // Every `GET /v1/me` lands here: read first, so that only a user's first sight writes
        // (a write is a transaction synced to disk); a concurrent first sight is settled by
        // the primary key and the second read.
        const SELECT: &str = "SELECT openid, nickname, avatar_url, created_at, updated_at \
                              FROM profiles WHERE openid = $1";
        let existing: Option<Row> = sqlx::query_as(SELECT)
            .bind(openid)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        if let Some(row) = existing {
            return Ok(profile(row));
        }
        let turn = self.turn.take().await.map_err(ApiError::unavailable)?;
        sqlx::query(
            "INSERT INTO profiles (openid, created_at, updated_at) VALUES ($1, $2, $2) \
             ON CONFLICT (openid) DO NOTHING",
        )
        .bind(openid)
        .bind(now_millis())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        drop(turn);
        let row: Row = sqlx::query_as(SELECT)
            .bind(openid)
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(profile(row))
    }

    async fn update(&self, openid: &str, patch: ProfilePatch) -> Result<Profile, ApiError> {
        self.get_or_create(openid).await?;
        let nickname = patch
            .nickname
            .as_ref()
            .map(|n| n.as_ref().map(|n| n.as_str()));
        let avatar_url = patch
            .avatar_url
            .as_ref()
            .map(|a| a.as_ref().map(|a| a.as_str()));
        // One statement: each field is changed only when the patch names it, so two
        // concurrent changes of different fields both stick.
        let _turn = self.turn.take().await.map_err(ApiError::unavailable)?;
        let row: Row = sqlx::query_as(
            "UPDATE profiles SET \
             nickname = CASE WHEN $2 THEN $3 ELSE nickname END, \
             avatar_url = CASE WHEN $4 THEN $5 ELSE avatar_url END, \
             updated_at = $6 \
             WHERE openid = $1 \
             RETURNING openid, nickname, avatar_url, created_at, updated_at",
        )
        .bind(openid)
        .bind(nickname.is_some())
        .bind(nickname.flatten())
        .bind(avatar_url.is_some())
        .bind(avatar_url.flatten())
        .bind(now_millis())
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(profile(row))
    }
}
